"""Tests for dcrouter.net.domains: normalisation, patterns and the wildcard matcher."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dcrouter.net.domains import DomainMatcher, is_valid_domain_pattern, normalize_domain

_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_names = st.lists(_labels, min_size=1, max_size=5).map(".".join)


class NormalizeDomainTests(SynchronousTestCase):
    def test_lower_case_and_one_trailing_dot(self) -> None:
        self.assertEqual(normalize_domain("Mail.EXAMPLE.com."), "mail.example.com")

    def test_two_trailing_dots_are_invalid(self) -> None:
        self.assertRaises(ValueError, normalize_domain, "example.com..")

    def test_u_label_becomes_a_label(self) -> None:
        self.assertEqual(normalize_domain("Bücher.Example"), "xn--bcher-kva.example")

    def test_a_label_is_kept(self) -> None:
        self.assertEqual(normalize_domain("XN--BCHER-KVA.example"), "xn--bcher-kva.example")

    def test_invalid_a_label(self) -> None:
        self.assertRaises(ValueError, normalize_domain, "xn--zz-.example")

    def test_invalid_names(self) -> None:
        for name in [
            "",
            ".",
            "a..b",
            ".a.b",
            "-a.example",
            "a-.example",
            "under_score.example",
            "sp ace.example",
            "*.example.com",
            "[1.2.3.4]",
            "a@b",
            "a" * 64 + ".example",
            ".".join(["a" * 63] * 4) + ".ab",  # 254 octets
            "\u2603\u0000.example",
        ]:
            with self.subTest(name=name):
                self.assertRaises(ValueError, normalize_domain, name)

    def test_longest_name(self) -> None:
        name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 octets
        self.assertEqual(normalize_domain(name + "."), name)

    def test_numeric_labels_and_single_label(self) -> None:
        self.assertEqual(normalize_domain("123.example"), "123.example")
        self.assertEqual(normalize_domain("LocalHost"), "localhost")

    def test_error_names_the_input(self) -> None:
        with self.assertRaises(ValueError) as caught:
            normalize_domain("bad_name.example")
        self.assertIn("bad_name.example", str(caught.exception))

    @given(_names)
    def test_idempotent(self, name: str) -> None:
        once = normalize_domain(name.upper())
        self.assertEqual(once, name)
        self.assertEqual(normalize_domain(once), once)

    @given(st.text(max_size=40))
    def test_only_value_error(self, name: str) -> None:
        try:
            result = normalize_domain(name)
        except ValueError:
            return
        self.assertTrue(result.isascii())
        self.assertEqual(result, result.lower())


class PatternTests(SynchronousTestCase):
    def test_valid(self) -> None:
        for pattern in ["example.com", "*.example.com", "EXAMPLE.com.", "*.bücher.example", "localhost"]:
            with self.subTest(pattern=pattern):
                self.assertTrue(is_valid_domain_pattern(pattern))

    def test_invalid(self) -> None:
        invalid = ["*", "*.", "**.example.com", "a.*.example.com", "*example.com", "example.*", "", "a b"]
        for pattern in invalid:
            with self.subTest(pattern=pattern):
                self.assertFalse(is_valid_domain_pattern(pattern))


class DomainMatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.matcher: DomainMatcher[str] = DomainMatcher(
            [
                ("example.com", "exact"),
                ("*.example.com", "wild"),
                ("*.deep.example.com", "deeper"),
                ("special.deep.example.com", "special"),
                ("*.Bücher.example", "idn"),
            ]
        )

    def test_exact(self) -> None:
        self.assertEqual(self.matcher.match("example.com"), "exact")
        self.assertEqual(self.matcher.match("EXAMPLE.COM."), "exact")

    def test_wildcard_matches_one_and_more_labels(self) -> None:
        self.assertEqual(self.matcher.match("a.example.com"), "wild")
        self.assertEqual(self.matcher.match("a.b.example.com"), "wild")

    def test_wildcard_does_not_match_its_base(self) -> None:
        matcher = DomainMatcher([("*.example.org", 1)])
        self.assertIsNone(matcher.match("example.org"))
        self.assertEqual(matcher.match("x.example.org"), 1)

    def test_most_specific_wildcard_wins(self) -> None:
        self.assertEqual(self.matcher.match("x.deep.example.com"), "deeper")
        self.assertEqual(self.matcher.match("y.x.deep.example.com"), "deeper")
        self.assertEqual(self.matcher.match("deep.example.com"), "wild")

    def test_exact_beats_wildcard(self) -> None:
        self.assertEqual(self.matcher.match("special.deep.example.com"), "special")

    def test_no_match(self) -> None:
        for name in ["example.org", "notexample.com", "com", "example.com.evil", "xexample.com"]:
            with self.subTest(name=name):
                self.assertIsNone(self.matcher.match(name))

    def test_invalid_name_matches_nothing(self) -> None:
        self.assertIsNone(self.matcher.match("a_b.example.com"))
        self.assertIsNone(self.matcher.match(""))
        self.assertIsNone(self.matcher.match("[1.2.3.4]"))

    def test_idn_either_form(self) -> None:
        self.assertEqual(self.matcher.match("shop.xn--bcher-kva.example"), "idn")
        self.assertEqual(self.matcher.match("shop.BÜCHER.example"), "idn")

    def test_first_duplicate_wins(self) -> None:
        matcher = DomainMatcher([("a.test", 1), ("A.TEST.", 2), ("*.a.test", 3), ("*.a.test", 4)])
        self.assertEqual(matcher.match("a.test"), 1)
        self.assertEqual(matcher.match("b.a.test"), 3)
        self.assertEqual(len(matcher), 2)

    def test_falsy_values_are_matches(self) -> None:
        matcher: DomainMatcher[int | None] = DomainMatcher([("zero.test", 0), ("*.none.test", None)])
        self.assertEqual(matcher.match("zero.test"), 0)
        self.assertIsNone(matcher.match("a.none.test"))

    def test_invalid_pattern_is_named(self) -> None:
        with self.assertRaises(ValueError) as caught:
            DomainMatcher([("ok.test", 1), ("a.*.test", 2)])
        self.assertIn("a.*.test", str(caught.exception))

    def test_many_patterns(self) -> None:
        matcher = DomainMatcher((f"*.d{i}.test", i) for i in range(10_000))
        self.assertEqual(matcher.match("x.d9999.test"), 9999)
        self.assertIsNone(matcher.match("d9999.test"))

    @given(_names, _names)
    def test_wildcard_property(self, prefix: str, base: str) -> None:
        matcher = DomainMatcher([("*." + base, True)])
        self.assertTrue(matcher.match(prefix + "." + base))
        self.assertIsNone(matcher.match(base))
