"""Built-in content scanners (IScanner): attachments, spam (heuristics, spamd, rspamd), virus (clamd)."""
