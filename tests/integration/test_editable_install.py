"""``pip install -e .`` in a fresh virtualenv, offline: ``twistd dcrouter`` finds the plugin without
``PYTHONPATH``, from any directory, and the ``dcrouter`` command runs.

The fresh environment gets the test venv's dependencies (Twisted, cryptography, ...) through a ``.pth``
file naming a directory of links to them, which leaves out every installed copy of dcrouter (the test venv's
own, and its ``twisted/plugins/dcrouter_plugin.py``), so only the editable install can provide the plugin.
pip builds the editable wheel with the test venv's setuptools (no build isolation, no index): nothing is
downloaded.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from importlib import metadata

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration import CHECKOUT, TwistdProcess

#: What an editable install of dcrouter needs from the checkout.
SOURCES = ("pyproject.toml", "README.md", "dcrouter", "twisted")


def _setuptools_version() -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return (0,)


def _link_dependencies(site_packages: str, target: str) -> None:
    """``target`` gets a link to every entry of ``site_packages`` except dcrouter's; ``twisted`` and
    ``twisted/plugins`` are rebuilt as directories of links so dcrouter's plugin file stays out."""
    os.makedirs(target)
    for name in os.listdir(site_packages):
        if name.startswith(("dcrouter", "__editable__", "_dcrouter")) or name.endswith(".pth"):
            continue
        source = os.path.join(site_packages, name)
        if name == "twisted":
            _link_twisted(source, os.path.join(target, name))
        else:
            os.symlink(source, os.path.join(target, name))


def _link_twisted(twisted: str, target: str) -> None:
    os.makedirs(os.path.join(target, "plugins"))
    for name in os.listdir(twisted):
        if name != "plugins":
            os.symlink(os.path.join(twisted, name), os.path.join(target, name))
    plugins = os.path.join(twisted, "plugins")
    for name in os.listdir(plugins):
        if not name.startswith("dcrouter") and name != "dropin.cache":
            os.symlink(os.path.join(plugins, name), os.path.join(target, "plugins", name))


class EditableInstallTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        if _setuptools_version() < (77,):
            raise SkipTest("needs setuptools>=77 in the test venv to build offline (make venv installs it)")

    async def run_in(self, argv: list[str], cwd: str) -> TwistdProcess:
        process = TwistdProcess()
        environment = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
        reactor.spawnProcess(process, argv[0], argv, env=environment, path=cwd)
        self.addCleanup(process.kill_on_cleanup)
        await process.ended
        return process

    def test_twistd_finds_the_plugin_of_an_editable_install(self) -> Deferred[None]:
        async def go() -> None:
            base = os.path.abspath(self.mktemp())
            source, venv, elsewhere = (os.path.join(base, name) for name in ("src", "venv", "elsewhere"))
            os.makedirs(source)
            os.makedirs(elsewhere)
            ignore = shutil.ignore_patterns("__pycache__", "dropin.cache", "*.egg-info")
            for name in SOURCES:
                path = os.path.join(CHECKOUT, name)
                if os.path.isdir(path):
                    shutil.copytree(path, os.path.join(source, name), ignore=ignore)
                else:
                    shutil.copy(path, source)
            made = await self.run_in([sys.executable, "-m", "venv", "--without-pip", venv], base)
            self.assertEqual(made.exit_code, 0, made.output)
            python = os.path.join(venv, "bin", "python")
            purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
            found = await self.run_in([python, "-c", purelib], base)
            fresh_site = found.output.decode().strip()
            _link_dependencies(sysconfig.get_path("purelib"), os.path.join(base, "deps"))
            with open(os.path.join(fresh_site, "test_dependencies.pth"), "w") as handle:
                handle.write(os.path.join(base, "deps") + "\n")
            pip = [sys.executable, "-m", "pip", "--isolated", "--python", python, "install", "--quiet"]
            pip += ["--no-deps", "--no-build-isolation", "--no-index", "--editable", source]
            installed = await self.run_in(pip, base)
            self.assertEqual(installed.exit_code, 0, installed.output.decode("utf-8", "replace"))

            twistd = [python, "-c", "from twisted.scripts.twistd import run; run()"]
            helped = await self.run_in([*twistd, "dcrouter", "--help"], elsewhere)
            self.assertEqual(helped.exit_code, 0, helped.output.decode("utf-8", "replace"))
            self.assertIn(b"smartProxyConfig", helped.output)
            where = await self.run_in(
                [python, "-c", "import twisted.plugins.dcrouter_plugin as p, dcrouter; print(p.__file__)"],
                elsewhere,
            )
            plugin = os.path.join(source, "twisted", "plugins", "dcrouter_plugin.py")
            self.assertEqual(where.output.decode().strip(), plugin)
            command = await self.run_in([os.path.join(venv, "bin", "dcrouter"), "--version"], elsewhere)
            self.assertEqual((command.exit_code, command.output.strip()), (0, b"dcrouter 0.1.0.dev0"))

        return Deferred.fromCoroutine(go())
