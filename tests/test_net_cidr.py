"""Tests for dcrouter.net.cidr.CidrSet."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.net.cidr import CidrSet


def _case(version: int) -> st.SearchStrategy[tuple[list[tuple[int, int]], int, int]]:
    """Random networks plus one near the probe: the probe with one bit flipped, so it is inside exactly when
    the flipped bit is a host bit. Both outcomes are then common."""
    bits = 32 if version == 4 else 128

    def build(probe: int, flip: int, prefix: int, others: list[tuple[int, int]]) -> tuple:
        return ([(probe ^ (1 << flip), prefix), *others], probe, version)

    return st.builds(
        build,
        st.integers(0, 2**bits - 1),
        st.integers(0, bits - 1),
        st.integers(0, bits),
        st.lists(st.tuples(st.integers(0, 2**bits - 1), st.integers(0, bits)), max_size=6),
    )


class CidrSetTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cidrs = CidrSet(["10.9.0.0/16", "192.0.2.7", "2001:db8::/32", "::1", "0.0.0.0/32"])

    def test_ipv4_network(self) -> None:
        self.assertIn("10.9.0.1", self.cidrs)
        self.assertIn("10.9.255.255", self.cidrs)
        self.assertNotIn("10.10.0.1", self.cidrs)
        self.assertNotIn("10.8.255.255", self.cidrs)

    def test_bare_addresses_are_single_hosts(self) -> None:
        self.assertIn("192.0.2.7", self.cidrs)
        self.assertNotIn("192.0.2.8", self.cidrs)
        self.assertIn("::1", self.cidrs)
        self.assertNotIn("::2", self.cidrs)

    def test_ipv6_network(self) -> None:
        self.assertIn("2001:db8:ffff::1", self.cidrs)
        self.assertIn("2001:DB8::", self.cidrs)
        self.assertNotIn("2001:db9::1", self.cidrs)

    def test_ipv4_mapped_matches_ipv4_networks(self) -> None:
        self.assertIn("::ffff:10.9.1.2", self.cidrs)
        self.assertIn("::ffff:c000:207", self.cidrs)  # 192.0.2.7
        self.assertNotIn("::ffff:10.10.1.2", self.cidrs)

    def test_mapped_network_entry_matches_plain_ipv4(self) -> None:
        cidrs = CidrSet(["::ffff:172.16.0.0/108"])
        self.assertIn("172.16.3.4", cidrs)
        self.assertIn("::ffff:172.16.3.4", cidrs)
        self.assertNotIn("172.32.0.1", cidrs)

    def test_families_do_not_mix(self) -> None:
        # 10.9.0.0 as an integer is inside ::a09:0/112 but that is a different address.
        self.assertNotIn("::a09:1", self.cidrs)
        self.assertNotIn("0.0.0.1", CidrSet(["::/127"]))

    def test_not_an_address(self) -> None:
        for value in ["", "localhost", "10.9.0.0/16", "/tmp/sock", "10.9.0.1 ", None, 167837697]:
            with self.subTest(value=value):
                self.assertNotIn(value, self.cidrs)

    def test_empty_set(self) -> None:
        cidrs = CidrSet([])
        self.assertNotIn("127.0.0.1", cidrs)
        self.assertEqual(len(cidrs), 0)

    def test_everything(self) -> None:
        cidrs = CidrSet(["0.0.0.0/0", "::/0"])
        self.assertIn("203.0.113.9", cidrs)
        self.assertIn("2001:db8::9", cidrs)

    def test_invalid_entries_are_named(self) -> None:
        for entry in ["10.0.0.0/33", "10.0.0.1/8", "not-an-ip", "", "2001:db8::/129", "1.2.3"]:
            with self.subTest(entry=entry):
                with self.assertRaises(ValueError) as caught:
                    CidrSet(["127.0.0.1", entry])
                self.assertIn(repr(entry), str(caught.exception))

    def test_surrounding_whitespace_tolerated(self) -> None:
        self.assertIn("10.1.2.3", CidrSet([" 10.0.0.0/8 "]))

    def test_len_and_repr(self) -> None:
        self.assertEqual(len(self.cidrs), 5)
        self.assertIn("5", repr(self.cidrs))

    @given(st.sampled_from([4, 6]).flatmap(_case))
    def test_agrees_with_ipaddress(self, case: tuple[list[tuple[int, int]], int, int]) -> None:
        entries, probe_int, version = case
        family = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        probe = family(probe_int)
        networks = [ipaddress.ip_network((family(a), p), strict=False) for a, p in entries]
        cidrs = CidrSet(str(n) for n in networks)
        self.assertEqual(str(probe) in cidrs, any(probe in n for n in networks))
