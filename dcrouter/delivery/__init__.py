"""Outbound delivery: routes, the ESMTP client and its connection pool, scheduling, retries and bounces."""
