"""Built-in content scanners (IScanner): attachment policy, spam (heuristics, spamd, rspamd), virus (clamd)."""
