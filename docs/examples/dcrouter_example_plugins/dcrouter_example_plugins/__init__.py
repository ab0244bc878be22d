"""Example dcrouter plugins (docs/plugins.md): :class:`~dcrouter_example_plugins.keyword.KeywordScanner`
and :class:`~dcrouter_example_plugins.subject.SubjectTag`."""
