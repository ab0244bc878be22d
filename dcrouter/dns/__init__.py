"""The router's own authoritative DNS server (``dnsServerConfig``): its zones built from the configuration
(:mod:`.zone`), the answers (:mod:`.answer`) and the UDP/TCP service (:mod:`.service`). See docs/dns.md."""
