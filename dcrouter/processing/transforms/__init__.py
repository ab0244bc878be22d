"""Built-in transformations (ITransformation): headers, addresses, attachments, footers, DKIM."""
