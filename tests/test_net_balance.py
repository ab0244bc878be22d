"""The proxy's balancers (``action.loadBalancing``): weighted round robin spread, least connections, and
sticky source hashing that moves only a failed target's share."""

from __future__ import annotations

from collections import Counter

from twisted.trial.unittest import SynchronousTestCase

from dcrouter.net.balance import Balancer
from dcrouter.net.targets import Target

A, B, C = (Target(h, h, 80) for h in ("a.test", "b.test", "c.test"))


class RoundRobinTests(SynchronousTestCase):
    def test_equal_weights_take_turns(self) -> None:
        balancer = Balancer()
        firsts = [balancer.order([A, B, C])[0] for _ in range(6)]
        self.assertEqual(firsts, [A, B, C, A, B, C])

    def test_weights_share_and_interleave(self) -> None:
        balancer = Balancer("roundRobin")
        firsts = [balancer.order([A, B, C], [5, 1, 2])[0] for _ in range(80)]
        self.assertEqual(Counter(firsts), {A: 50, B: 10, C: 20})
        # Smooth (nginx's order): the heavy target's turns are spread through each cycle of 8, not in a burst.
        self.assertEqual("".join(t.host[0] for t in firsts[:8]), "acaabaca")

    def test_the_order_is_a_permutation_for_failover(self) -> None:
        balancer = Balancer()
        for _ in range(5):
            self.assertEqual(sorted(balancer.order([A, B, C], [3, 1, 1]), key=str), [A, B, C])


class LeastConnectionsTests(SynchronousTestCase):
    def test_fewest_open_connections_first(self) -> None:
        balancer = Balancer("leastConnections")
        self.assertEqual(balancer.order([A, B, C], connections={A: 3, B: 1, C: 2}), [B, C, A])

    def test_per_unit_of_weight(self) -> None:
        balancer = Balancer("leastConnections")
        # A: 4 connections for weight 4 (1 each) beats B: 2 for weight 1.
        self.assertEqual(balancer.order([A, B], [4, 1], connections={A: 4, B: 2})[0], A)

    def test_ties_go_round_robin(self) -> None:
        balancer = Balancer("leastConnections")
        firsts = [balancer.order([A, B, C], connections={})[0] for _ in range(3)]
        self.assertEqual(sorted(firsts, key=str), [A, B, C])


class SourceHashTests(SynchronousTestCase):
    clients = [f"10.0.{i // 256}.{i % 256}" for i in range(2000)] + [
        f"2001:db8::{i:x}" for i in range(1, 255)
    ]

    def test_sticky(self) -> None:
        balancer = Balancer("sourceHash")
        for ip in self.clients[:20]:
            first = balancer.order([A, B, C], client_ip=ip)[0]
            self.assertEqual({balancer.order([A, B, C], client_ip=ip)[0] for _ in range(5)}, {first})

    def test_spread_by_weight(self) -> None:
        balancer = Balancer("sourceHash")
        share = Counter(balancer.order([A, B], [3, 1], client_ip=ip)[0] for ip in self.clients)
        self.assertLess(abs(share[A] / len(self.clients) - 0.75), 0.03)

    def test_a_target_leaving_moves_only_its_clients(self) -> None:
        balancer = Balancer("sourceHash")
        before = {ip: balancer.order([A, B, C], client_ip=ip) for ip in self.clients}
        for ip, order in before.items():
            # With C gone (health checks drop it from the order), its clients go to their second choice
            # and every other client stays where it was.
            remaining = [t for t in order if t != C]
            if order[0] != C:
                self.assertEqual(remaining[0], order[0])
            after = balancer.order([A, B], client_ip=ip)[0]
            self.assertEqual(after, remaining[0])
        moved = sum(1 for order in before.values() if order[0] == C)
        self.assertLess(abs(moved / len(self.clients) - 1 / 3), 0.03)
