"""The mail vocabulary every layer speaks: the envelope, queue ids, SMTP replies, the spooled message
handle, addresses and address patterns, header blocks, DKIM keys. It imports nothing of dcrouter above
``dcrouter.net`` and ``dcrouter.interfaces``."""
