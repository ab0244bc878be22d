"""The configurations bench/ingress.py generates for its dcrouter variants load without an error (a key
renamed in the schema would otherwise surface only as a server that does not start in a benchmark run)."""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from bench import ingress
from dcrouter.config import load_file


class GeneratedConfigTests(TestCase):
    def test_every_dcrouter_variant_loads(self) -> None:
        kinds = [
            ingress.Dcrouter,
            ingress.DcrouterLimits,
            ingress.DcrouterObserved,
            ingress.DcrouterObservedHooks,
        ]
        for kind in kinds:
            workdir = self.mktemp()
            directory = os.path.join(workdir, kind.name)
            os.makedirs(directory)
            server = kind(workdir)
            server.port = ingress.free_port()
            server.command(directory)
            hooks = getattr(server, "_hooks", None)
            if hooks is not None:
                hooks.server_close()
            options = load_file(os.path.join(directory, "dcrouter.toml")).options
            observed = isinstance(server, ingress.DcrouterObserved)
            self.assertEqual(options.api_config.enabled, observed, kind.name)
            metrics = options.metrics_config
            self.assertEqual(metrics is not None and metrics.enabled, observed, kind.name)
            assert options.smtp_config is not None
            limited = bool(options.smtp_config.rate_limits.anonymous.messages)
            self.assertEqual(limited, kind is ingress.DcrouterLimits, kind.name)
        self.assertIn("message.queued", ingress.DcrouterObservedHooks.hook_types)
        self.assertNotIn("message.queued", ingress.DcrouterObserved.hook_types)
