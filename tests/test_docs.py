"""The documents run: every example in README.md and docs/*.md that can run offline is run, parsed or loaded,
so what the docs tell a reader to type cannot drift from what dcrouter does.

What is checked, and the conventions a page follows for it:

- **Commands** in ```sh blocks (one per line; ``\\`` continues a line, ``#`` starts a comment), in unlabelled
  blocks whose lines start with one of dcrouter's own commands, in ```ini blocks' ``ExecStart=`` lines, and in
  inline code spans that are a ``twistd`` or ``dcrouter`` command line:
  ``twistd ...`` is parsed by twistd's own option parser with the dcrouter plugin (twistd's options go
  before ``dcrouter``); one with ``--check`` or ``--help`` is run for real (a ``twistd`` process, from this
  checkout).
  ``dcrouter ...`` is parsed by the command's own parser; ``dcrouter check FILE`` is run; ``dcrouter COMMAND
  --help`` is run for every command named anywhere. ``python -m bench.X`` runs ``--help`` and every option the
  docs pass must be in it; ``python -m twisted.trial M`` needs the module ``M``; ``make T`` needs the target
  (``VAR=value`` arguments set make variables).
  A configuration file a command names that is not in the checkout (``my.toml``, ``/etc/dcrouter/...``,
  ``FILE``) stands for the reader's own and is replaced by etc/dcrouter.example.toml; a user or group name
  given to ``--uid``/``--gid`` by the current user's. Other programs (pip, openssl, swaks, ...) are not run.
- **Configurations**: every ```toml and ```json block, and every block of another label whose first line
  opens a dcrouter table (``[smtpConfig]``, ``[[smartProxyConfig.routes]]``, ...), is checked as ``--check``
  does (``dcrouter.tap.check``) and must be valid. Certificate, key and DKIM key files it names under an
  absolute path are generated for the check. A comment on the line before the fence changes that:

  - ``<!-- check: fragment -->``: the block is a part of a configuration; it is merged into ``CONTEXT`` (a
    small valid SMTP gateway: tables merged, lists of tables appended) and the result is checked;
  - ``<!-- check: skip: REASON -->``: not checked, and the reason says why (not a dcrouter configuration,
    an excerpt that needs a plugin installed, ...).

- A ```python block that calls ``DcRouter({...})`` with a literal mapping: the mapping must load.
- Every ``dcrouter`` command exists in the README or a docs page, and ``twistd dcrouter --help`` describes the
  SMTP gateway and the proxy.
"""

from __future__ import annotations

import ast
import copy
import glob
import io
import json
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredSemaphore, gatherResults
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dcrouter import cli, tap
from dcrouter.config import ConfigError, load_options
from dcrouter.net.certfiles import generate_self_signed
from tests.integration import CHECKOUT, TWISTD, TwistdProcess, twistd_environment

EXAMPLE_CONFIG = os.path.join(CHECKOUT, "etc", "dcrouter.example.toml")
#: The private design notes' file name, spelt in two parts so this file does not name it.
DESIGN_MAP = "DESIGN" + ".md"
#: The directory beside the checkout those notes lived in.
OUTSIDE = "../" + "shared/"

#: The pages whose examples are checked.
PAGES = sorted(
    os.path.relpath(path, CHECKOUT)
    for path in [os.path.join(CHECKOUT, "README.md"), *glob.glob(os.path.join(CHECKOUT, "docs", "*.md"))]
)

#: What a ``<!-- check: fragment -->`` block is merged into: an SMTP gateway that needs nothing else.
CONTEXT: dict[str, Any] = {
    "smtpConfig": {
        "ports": [2525],
        "hostname": "mx.example.com",
        "domainConfigs": [{"domains": ["context.example"], "targetIPs": ["127.0.0.1"]}],
    }
}

#: Tables that start a dcrouter configuration, whatever the block is labelled.
CONFIG_START = re.compile(r"\[\[?(smtpConfig|smartProxyConfig|httpDomainRoutes|tls|mtaConfig)[\].]")
MARKER = re.compile(r"<!--\s*check:\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
#: Commands that are dcrouter's (or its checkout's), checked here; anything else is another program's.
OWN_COMMANDS = {"twistd", "dcrouter", "python", "python3", "make"}
#: Packages of the checkout a ``python -m`` command may name.
OWN_PACKAGES = {"bench", "dcrouter", "tests"}
#: Options whose value names a configuration file.
CONFIG_OPTIONS = {"--config", "-c"}
#: Files a configuration example may name that are generated for the check, by key.
MATERIAL_KEYS = {
    "certPath": "cert",
    "caPath": "cert",
    "backendCaFile": "cert",
    "keyPath": "key",
    "privateKey": "dkim",
}


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page: where it starts, its label, its text and its check marker."""

    page: str
    line: int
    label: str
    text: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def page_text(page: str) -> str:
    with open(os.path.join(CHECKOUT, page), encoding="utf-8") as handle:
        return handle.read()


def blocks(page: str, text: str | None = None) -> Iterator[Block]:
    """The fenced blocks of ``page`` (its text read unless given), indented ones (in lists) included."""
    lines = (page_text(page) if text is None else text).split("\n")
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, label = opening.groups()
        end = index + 1
        while end < len(lines) and not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
        body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[index + 1 : end]]
        marker = None
        before = index - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        if before >= 0:
            found = MARKER.search(lines[before])
            marker = found.group(1) if found else None
        yield Block(page, index + 1, label, "\n".join(body), marker)
        index = end + 1


def prose(text: str) -> str:
    """The text of a page outside its fenced blocks."""
    kept, inside = [], False
    for line in text.split("\n"):
        if FENCE.match(line) or (inside and re.match(r"^\s*```\s*$", line)):
            inside = not inside
            continue
        if not inside:
            kept.append(line)
    return "\n".join(kept)


# -- commands ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    where: str
    argv: list[str]
    #: Prose naming a command (`dcrouter quarantine`) rather than giving a whole command line.
    names_only: bool = False

    @property
    def program(self) -> str:
        return os.path.basename(self.argv[0])


def _split(line: str) -> list[str]:
    # "<generated toml>", "<dcrouter pid>": a value the reader fills in, one word here.
    line = re.sub(r"<[A-Za-z][^<>]*>", "FILE", line)
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return line.split()


def block_commands(block: Block) -> Iterator[Command]:
    """The command lines of a block: every line of an ```sh block, ``ExecStart*=`` lines of an ```ini block,
    and lines of an unlabelled block that start with one of dcrouter's own commands."""
    if block.label == "ini":
        for number, line in enumerate(block.text.split("\n")):
            found = re.match(r"\s*ExecStart(?:Pre|Post)?=-?(.*)", line)
            if found:
                yield Command(f"{block.where}+{number + 1}", _split(found.group(1)))
        return
    if block.label not in ("sh", ""):
        return
    pending, start = "", 0
    for number, line in enumerate(block.text.split("\n")):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        argv = _split(pending + line)
        pending = ""
        if not argv:
            continue
        if block.label == "" and os.path.basename(argv[0]) not in OWN_COMMANDS:
            continue
        yield Command(f"{block.where}+{start + 1}", argv)


def inline_commands(page: str, text: str | None = None) -> Iterator[Command]:
    """Inline code spans in the prose that are a ``twistd ... dcrouter`` or a ``dcrouter COMMAND`` line.
    A synopsis (``list|show``, ``[ID]``) is not a command line and is left out."""
    body = prose(page_text(page) if text is None else text)
    for found in re.finditer(r"`([^`\n]+)`", body):
        if re.search(r"[|\[\]]", found.group(1)):
            continue
        argv = _split(found.group(1))
        if not argv:
            continue
        program = os.path.basename(argv[0])
        is_twistd = program == "twistd" and "dcrouter" in argv[1:]
        if is_twistd or (program == "dcrouter" and len(argv) > 1 and not argv[1].startswith("-")):
            line = body.count("\n", 0, found.start()) + 1
            names_only = program == "dcrouter" and len(argv) == 2
            yield Command(f"{page}: `{found.group(1)}` (prose line ~{line})", argv, names_only)


def all_commands() -> list[Command]:
    found: list[Command] = []
    for page in PAGES:
        for block in blocks(page):
            found.extend(block_commands(block))
        found.extend(inline_commands(page))
    return found


def _own_user_names(argv: list[str]) -> list[str]:
    """``--uid NAME``/``--gid NAME`` (a deployment's account) as this process's own ids, so twistd's parser,
    which looks names up, parses the line on any machine."""
    result = list(argv)
    for i, arg in enumerate(result[:-1]):
        if arg in ("--uid", "-u"):
            result[i + 1] = str(os.getuid())
        elif arg in ("--gid", "-g"):
            result[i + 1] = str(os.getgid())
    return result


def _local_config(argv: list[str], file_positions: set[int]) -> list[str]:
    """``argv`` with configuration file names made absolute: one in the checkout (relative to its root, as
    the docs write them) as itself, any other (``my.toml``, ``FILE``, ``...``, ``/etc/dcrouter/...``) as the
    example. A ``...`` that is not a file (more options the reader adds) is dropped."""

    def local(name: str) -> str:
        path = os.path.join(CHECKOUT, name)
        return path if name not in ("FILE", "...") and os.path.exists(path) else EXAMPLE_CONFIG

    result: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            result.append("--config=" + local(arg.split("=", 1)[1]))
        elif i in file_positions or (i > 0 and argv[i - 1] in CONFIG_OPTIONS):
            result.append(local(arg))
        elif arg != "...":
            result.append(arg)
    return result


def twistd_argv(command: Command) -> list[str]:
    """The arguments after ``twistd``, made runnable here (see the module docstring). Without ``--config``
    dcrouter reads the reader's default file; the example stands in for it."""
    args = _own_user_names(_local_config(command.argv[1:], set()))
    after = args[args.index("dcrouter") + 1 :] if "dcrouter" in args else []
    if "dcrouter" in args and not any(a in CONFIG_OPTIONS or a.startswith("--config=") for a in after):
        args += ["--config", EXAMPLE_CONFIG]
    return args


def dcrouter_argv(command: Command) -> list[str]:
    """The arguments after ``dcrouter``: the file of ``check FILE`` and ``--config FILE`` made local."""
    args = command.argv[1:]
    positions = {1} if args[:1] == ["check"] else set()
    return _local_config(args, positions)


def parse_twistd(args: list[str]) -> str | None:
    """None when twistd's parser (dcrouter's options included) takes ``args``, else why not. ``--check``
    and ``--help`` exit from the parser; exit status 0 counts as taken."""
    from twisted.scripts._twistd_unix import ServerOptions

    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        options = ServerOptions()
        options.parseOptions(args)
        if options.subCommand != "dcrouter":
            return f"twistd runs {options.subCommand!r}, not dcrouter"
    except usage.UsageError as error:
        return f"twistd: {error}"
    except SystemExit as leaving:
        if leaving.code not in (0, None):
            return f"exit status {leaving.code}: {err.getvalue().strip() or out.getvalue().strip()}"
    finally:
        sys.stdout, sys.stderr = saved
    return None


def parse_dcrouter(args: list[str]) -> str | None:
    """None when the ``dcrouter`` command's parser takes ``args``, else its complaint."""
    err = io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.StringIO(), err
    try:
        cli._parser().parse_args(args)
    except SystemExit as leaving:
        if leaving.code not in (0, None):
            return err.getvalue().strip() or f"exit status {leaving.code}"
    finally:
        sys.stdout, sys.stderr = saved
    return None


def makefile_targets() -> set[str]:
    with open(os.path.join(CHECKOUT, "Makefile"), encoding="utf-8") as handle:
        return set(re.findall(r"^([A-Za-z][\w-]*):", handle.read(), re.MULTILINE))


def module_exists(name: str) -> bool:
    base = os.path.join(CHECKOUT, *name.split("."))
    return os.path.exists(base + ".py") or os.path.exists(os.path.join(base, "__init__.py"))


def python_module(command: Command) -> tuple[str, list[str]] | None:
    """``(module, args)`` of a ``python -m module args`` command, else None."""
    if command.program.startswith("python") and len(command.argv) > 2 and command.argv[1] == "-m":
        return command.argv[2], command.argv[3:]
    return None


def parse_problem(command: Command) -> str | None:
    """Why ``command`` would fail as the docs write it, checked without running anything; None if it
    parses."""
    if command.program == "twistd":
        return parse_twistd(twistd_argv(command))
    if command.program == "dcrouter":
        if command.names_only:
            known = command.argv[1] in _subcommands()
            return None if known else f"no dcrouter command {command.argv[1]!r}"
        return parse_dcrouter(dcrouter_argv(command))
    if command.program == "make":
        # VAR=value arguments set make variables (make fuzz FUZZ_EXAMPLES=5000); the rest are targets.
        targets = [arg for arg in command.argv[1:] if "=" not in arg]
        missing = [target for target in targets if target not in makefile_targets()]
        return f"no make target {missing}" if missing else None
    module = python_module(command)
    if module is not None and module[0] == "twisted.trial":
        missing = [name for name in module[1] if not name.startswith("-") and not module_exists(name)]
        return f"no test module {missing}" if missing else None
    if module is not None and module[0].split(".")[0] in OWN_PACKAGES and not module_exists(module[0]):
        return f"no module {module[0]!r} in the checkout"
    return None


# -- configurations ------------------------------------------------------------------------------------------


def is_config(block: Block) -> bool:
    """Whether the block is a configuration to check (see the module docstring)."""
    if block.label in ("toml", "json"):
        return True
    first = next((line.strip() for line in block.text.split("\n") if line.strip()), "")
    return bool(CONFIG_START.match(first))


def parse_config(block: Block) -> dict[str, Any]:
    """The block's mapping; raises ValueError (TOML or JSON syntax) naming the block."""
    try:
        if block.label == "json" or block.text.lstrip().startswith("{"):
            data = json.loads(block.text)
        else:
            data = tomllib.loads(block.text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{block.where}: not valid {block.label or 'TOML'}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{block.where}: not a mapping")
    return data


def merge(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """``part`` merged into a copy of ``base``: tables merged key by key, lists of tables appended, other
    values replaced."""
    result = copy.deepcopy(base)
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        elif (
            isinstance(value, list)
            and isinstance(result.get(key), list)
            and all(isinstance(item, dict) for item in value + result[key])
        ):
            result[key] = result[key] + copy.deepcopy(value)
        else:
            result[key] = copy.deepcopy(value)
    return result


class Material:
    """Certificate, key and DKIM key files generated once per test, standing in for the files an example
    names under an absolute path that does not exist here."""

    def __init__(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        cert, key = generate_self_signed("mx.example.com")
        dkim = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        self.paths = {}
        for kind, data in (("cert", cert), ("key", key), ("dkim", dkim)):
            self.paths[kind] = os.path.join(directory, f"{kind}.pem")
            with open(self.paths[kind], "wb") as handle:
                handle.write(data)

    def substitute(self, value: Any) -> Any:
        """``value`` with every missing absolute certificate, key or DKIM key path replaced."""
        if isinstance(value, list):
            return [self.substitute(item) for item in value]
        if not isinstance(value, dict):
            return value
        result = {}
        for key, item in value.items():
            kind = MATERIAL_KEYS.get(key)
            if kind and isinstance(item, str) and item.startswith("/") and not os.path.exists(item):
                result[key] = self.paths[kind]
            else:
                result[key] = self.substitute(item)
        return result


def config_problem(block: Block, material: Material, directory: str) -> str | None:
    """Why the block's configuration does not pass ``--check``; None when it does (or is marked skip)."""
    marker = block.marker or ""
    if marker.startswith("skip"):
        return None if marker.partition(":")[2].strip() else f"{block.where}: a skip marker needs a reason"
    if marker not in ("", "fragment"):
        return f"{block.where}: unknown check marker {marker!r}"
    try:
        data = parse_config(block)
    except ValueError as error:
        return str(error)
    if marker == "fragment":
        data = merge(CONTEXT, data)
    path = os.path.join(directory, f"{block.page.replace('/', '_')}-{block.line}.json")
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(material.substitute(data), handle)
    out, err = io.StringIO(), io.StringIO()
    if tap.check(path, out, err) != 0:
        return f"{block.where}: --check fails:\n" + err.getvalue()
    return None


def python_dcrouter_mappings(block: Block) -> Iterator[dict[str, Any]]:
    """The literal mappings passed to ``DcRouter(...)`` in a Python block."""
    for node in ast.walk(ast.parse(block.text)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DcRouter" and node.args:
            yield ast.literal_eval(node.args[0])


# -- the tests -----------------------------------------------------------------------------------------------


class ConventionTests(SynchronousTestCase):
    """The checker itself: a stale example of each kind is caught (otherwise the doc tests could not fail)."""

    PAGE = "\n".join(
        [
            "Start it with `twistd --logfile x.log dcrouter --config FILE` or:",
            "",
            "```sh",
            "twistd dcrouter --config my.toml --logfile /var/log/dcrouter.log \\",
            "    --pidfile /run/dcrouter.pid",
            "dcrouter chekc my.toml   # a typo",
            "```",
            "",
            "```text",
            "[smtpConfig]",
            "ports = [25, 70000]",
            "```",
            "",
            "<!-- check: fragment -->",
            "```toml",
            "[smtpConfig]",
            "maxMesageSize = 1",
            "```",
            "",
            "<!-- check: skip -->",
            "```toml",
            "x = 1",
            "```",
        ]
    )

    def test_stale_commands_are_caught(self) -> None:
        (block, *_) = blocks("sample.md", self.PAGE)
        daemon, typo = block_commands(block)
        self.assertEqual(daemon.where, "sample.md:3+1")
        self.assertEqual(daemon.argv[-1], "/run/dcrouter.pid")  # the continuation line joined
        self.assertIn("--logfile", parse_problem(daemon) or "")
        self.assertIn("invalid choice: 'chekc'", parse_problem(typo) or "")
        (inline,) = inline_commands("sample.md", self.PAGE)
        self.assertIsNone(parse_problem(inline))  # twistd's option before dcrouter: fine

    def test_stale_configurations_are_caught(self) -> None:
        material = Material(self.mktemp())
        directory = self.mktemp()
        os.makedirs(directory)
        config_blocks = [block for block in blocks("sample.md", self.PAGE) if is_config(block)]
        self.assertEqual([block.label for block in config_blocks], ["text", "toml", "toml"])
        text, fragment, skipped = (config_problem(block, material, directory) for block in config_blocks)
        self.assertIn("smtpConfig.ports[1]: not a port number", text or "")
        self.assertIn("smtpConfig.maxMesageSize: unknown key", fragment or "")
        self.assertIn("a skip marker needs a reason", skipped or "")

    def test_fragment_merge(self) -> None:
        merged = merge(
            CONTEXT, {"smtpConfig": {"ports": [25], "domainConfigs": [{"domains": ["a.example"]}]}}
        )
        self.assertEqual(merged["smtpConfig"]["ports"], [25])
        self.assertEqual(len(merged["smtpConfig"]["domainConfigs"]), 2)
        self.assertEqual(CONTEXT["smtpConfig"]["ports"], [2525])


class DocumentExampleTests(SynchronousTestCase):
    def test_configuration_examples_pass_check(self) -> None:
        """Every configuration block passes ``--check`` (with its context, if marked a fragment)."""
        material = Material(self.mktemp())
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        checked, problems = 0, []
        for page in PAGES:
            for block in blocks(page):
                if is_config(block):
                    checked += 1
                    problem = config_problem(block, material, directory)
                    if problem:
                        problems.append(problem)
        self.assertEqual(problems, [], "\n\n".join(problems))
        self.assertGreater(checked, 5)

    def test_python_examples_load(self) -> None:
        """The options a Python example passes to DcRouter load."""
        problems, seen = [], 0
        for page in PAGES:
            for block in blocks(page):
                if block.label != "python":
                    continue
                for mapping in python_dcrouter_mappings(block):
                    seen += 1
                    try:
                        load_options(mapping)
                    except ConfigError as error:
                        problems.append(f"{block.where}: {error}")
        self.assertEqual(problems, [])
        self.assertGreater(seen, 0)

    def test_command_lines_parse(self) -> None:
        """Every twistd, dcrouter, make and python -m command line is taken by its parser as written."""
        commands = all_commands()
        problems = [f"{c.where}: {' '.join(c.argv)}\n  {p}" for c in commands if (p := parse_problem(c))]
        self.assertEqual(problems, [], "\n".join(problems))
        self.assertGreater(len([c for c in commands if c.program == "twistd"]), 3)

    def test_every_dcrouter_command_is_documented(self) -> None:
        text = "\n".join(page_text(page) for page in PAGES)
        subcommands = _subcommands()
        self.assertIn("check", subcommands)
        undocumented = [name for name in subcommands if f"dcrouter {name}" not in text]
        self.assertEqual(undocumented, [])

    def test_no_pointer_outside_the_repository(self) -> None:
        """The docs, code and tests send the reader to nothing outside the checkout (no private design notes):
        every relative link resolves to a file in it."""
        problems = []
        for page in PAGES:
            text = page_text(page)
            for found in re.finditer(r"\]\(([^)#]+)(#[^)]*)?\)|`(\.\./[^`]+)`", text):
                target = found.group(1) or found.group(3)
                if re.match(r"[a-z]+://", target):
                    continue
                resolved = os.path.normpath(os.path.join(CHECKOUT, os.path.dirname(page), target))
                if not resolved.startswith(CHECKOUT + os.sep) or not os.path.exists(resolved):
                    problems.append(f"{page}: {target}")
            if DESIGN_MAP in text:
                problems.append(f"{page}: names {DESIGN_MAP}, which is not in the repository")
        for directory in ("dcrouter", "twisted", "bench", "tests", "etc"):
            for path in glob.glob(os.path.join(CHECKOUT, directory, "**", "*.*"), recursive=True):
                if path.endswith((".py", ".toml", ".json", ".md")):
                    with open(path, encoding="utf-8") as handle:
                        content = handle.read()
                    if DESIGN_MAP in content or OUTSIDE in content:
                        problems.append(os.path.relpath(path, CHECKOUT))
        self.assertEqual(problems, [])


def _subcommands() -> list[str]:
    parser = cli._parser()
    for action in parser._actions:
        if action.dest == "command":
            return sorted(action.choices)  # type: ignore[arg-type]
    raise AssertionError("the dcrouter parser has no commands")


class CommandRunTests(TestCase):
    """The commands that only read: ``--check`` and ``--help`` of twistd and dcrouter, ``dcrouter check``, the
    benchmarks' ``--help``, all run as real processes from this checkout."""

    timeout = 180

    def run_process(self, argv: list[str]) -> Deferred[TwistdProcess]:
        process = TwistdProcess()
        reactor.spawnProcess(process, argv[0], argv, env=twistd_environment(), path=CHECKOUT)
        self.addCleanup(process.kill_on_cleanup)
        return process.ended.addCallback(lambda _: process)

    def run_all(self, runs: list[tuple[str, list[str]]]) -> Deferred[list[tuple[str, TwistdProcess]]]:
        """Run each ``(where, argv)``, two at a time; fires with ``(where, process)`` pairs, in order."""
        limit = DeferredSemaphore(2)

        def one(where: str, argv: list[str]) -> Deferred[tuple[str, TwistdProcess]]:
            return limit.run(self.run_process, argv).addCallback(lambda process: (where, process))

        return gatherResults([one(where, argv) for where, argv in runs])

    @staticmethod
    def failures(results: list[tuple[str, TwistdProcess]]) -> list[str]:
        return [
            f"{where}: exit status {process.exit_code}\n{process.output.decode('utf-8', 'replace').strip()}"
            for where, process in results
            if process.exit_code != 0
        ]

    def test_check_and_help_commands_run(self) -> Deferred[None]:
        runs: list[tuple[str, list[str]]] = []
        for command in all_commands():
            if command.program == "twistd":
                args = twistd_argv(command)
                if "--check" in args or "--help" in args:
                    runs.append((command.where, [*TWISTD, *args]))
            elif command.program == "dcrouter":
                args = dcrouter_argv(command)
                if args[:1] == ["check"] or "--help" in args:
                    runs.append((command.where, [sys.executable, "-m", "dcrouter.cli", *args]))

        async def go() -> None:
            self.assertGreater(len(runs), 2)
            problems = self.failures(await self.run_all(runs))
            self.assertEqual(problems, [], "\n\n".join(problems))

        return Deferred.fromCoroutine(go())

    def test_help_of_every_command_named(self) -> Deferred[None]:
        """``--help`` of twistd dcrouter, of dcrouter and each of its commands, and of each benchmark the
        docs name; the options the docs give a benchmark must be in its help."""
        commands = all_commands()
        named = sorted({c.argv[1] for c in commands if c.program == "dcrouter" and len(c.argv) > 1})
        named = [name for name in named if name in _subcommands()]
        modules: dict[str, set[str]] = {}
        for command in commands:
            module = python_module(command)
            if module is not None and module[0].startswith("bench."):
                options = {arg.split("=", 1)[0] for arg in module[1] if arg.startswith("--")}
                modules.setdefault(module[0], set()).update(options)
        runs = [
            ("twistd dcrouter --help", [*TWISTD, "dcrouter", "--help"]),
            ("dcrouter --help", [sys.executable, "-m", "dcrouter.cli", "--help"]),
        ]
        runs += [(f"dcrouter {n} --help", [sys.executable, "-m", "dcrouter.cli", n, "--help"]) for n in named]
        runs += [(f"python -m {m} --help", [sys.executable, "-m", m, "--help"]) for m in sorted(modules)]

        async def go() -> None:
            self.assertGreater(len(named), 3)
            self.assertIn("bench.relay", modules)
            results = await self.run_all(runs)
            problems = self.failures(results)
            self.assertEqual(problems, [], "\n\n".join(problems))
            helps = {where: process.output.decode("utf-8", "replace") for where, process in results}
            for module, options in sorted(modules.items()):
                missing = sorted(o for o in options if o not in helps[f"python -m {module} --help"])
                self.assertEqual(missing, [], f"{module} --help does not know {missing}")
            for subject in ("SMTP", "proxy", "--config", "--check"):
                self.assertIn(subject, helps["twistd dcrouter --help"])

        return Deferred.fromCoroutine(go())
