"""Tests for dcrouter.config.plugins with the example package in docs/examples/dcrouter_example_plugins:
plugins named by dotted path and by entry point, every configuration error with its key path, and the
plugins at work in the processing chain (configuration → build_chain → EmailProcessor → MemoryQueue).

Nothing is installed: the example package's directory goes on ``sys.path`` for a test, and entry points come
from a ``.dist-info`` directory the test writes (importlib.metadata finds it on ``sys.path``). Both are taken
away again, with the modules imported from them, when the test ends.
"""

from __future__ import annotations

import copy
import email
import email.policy
import importlib
import io
import os
import sys
import textwrap
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from dcrouter.config import plugins
from dcrouter.config.load import ConfigError, load_options
from dcrouter.config.processing import ScannerConfig, TransformationConfig
from dcrouter.config.schema import Report
from dcrouter.interfaces import IScanner, ITransformation
from dcrouter.mail.envelope import Envelope
from dcrouter.mail.headers import read_header_block
from dcrouter.mail.reply import Reply
from dcrouter.mail.spooled import SpooledMessage
from dcrouter.processing.build import build_chain
from dcrouter.processing.message import Discarded, Draft, Refusal, ScanResult, Verdict
from dcrouter.processing.mime import MimeLimits, inspect_message
from dcrouter.processing.processor import EmailProcessor
from dcrouter.queue.files import message_reader
from dcrouter.queue.item import QueueItem, QueueItemStatus
from dcrouter.queue.memory import MemoryQueue

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "docs", "examples", "dcrouter_example_plugins")
#: Modules a test may import from the directories it puts on sys.path; removed from sys.modules after it.
TEST_MODULES = ("dcrouter_example_plugins", "plugin_fixture_")

KEYWORD = "dcrouter_example_plugins.keyword:KeywordScanner"
SUBJECT_TAG = "dcrouter_example_plugins.subject:SubjectTag"

START = 1_700_000_000.0
MX_ONLY: dict[str, Any] = {
    "smtpConfig": {
        "ports": [2525],
        "hostname": "mx.example.com",
        "domainConfigs": [{"domains": ["example.com"], "targetIPs": ["10.0.0.10"]}],
    }
}

# Fixture modules written to a temporary directory by the tests that need them.
RAISES_ON_IMPORT = 'raise RuntimeError("plugin fixture exploded")\n'
NO_SCHEMA = """
    from zope.interface import implementer

    from dcrouter.interfaces import IScanner
    from dcrouter.processing.message import ScanResult, Verdict


    @implementer(IScanner)
    class PassScanner:
        name = "pass"

        def scan(self, message):
            return ScanResult(self.name, Verdict.CLEAN)


    def not_a_class(message):
        return None
"""
UNAVAILABLE = """
    from zope.interface import implementer

    from dcrouter.interfaces import IScanner
    from dcrouter.processing.message import ScannerUnavailable


    @implementer(IScanner)
    class DownScanner:
        name = "down"

        def scan(self, message):
            raise ScannerUnavailable("connection refused")
"""


def smtp(**keys: Any) -> dict[str, Any]:
    """MX_ONLY with smtpConfig keys replaced."""
    raw = copy.deepcopy(MX_ONLY)
    raw["smtpConfig"].update(keys)
    return raw


def keyword_config(action: str = "reject", **options: Any) -> dict[str, Any]:
    """A configuration with the keyword scanner (words: viagra, wire transfer) and the Subject tag."""
    options.setdefault("words", ["viagra", "wire transfer"])
    return smtp(
        contentScanning=True,
        scanners=[{"type": KEYWORD, "action": action, "options": options}],
        transformations=[{"type": SUBJECT_TAG, "options": {"prefix": "[EXTERNAL] "}}],
    )


def message(subject: str, body: str = "Lunch at noon?", *fields: str) -> bytes:
    head = ["From: alice@senders.test", "To: bob@example.com", f"Subject: {subject}", *fields]
    return ("\r\n".join(head) + "\r\n\r\n" + body + "\r\n").encode("utf-8")


def make_draft(data: bytes) -> Draft:
    """A Draft as the processor makes it, with work "in a thread" run inline."""
    headers, offset = read_header_block(io.BytesIO(data), 64 * 1024)
    return Draft(
        queue_id="TEST",
        envelope=Envelope("alice@senders.test", ["bob@example.com"]),
        source=SpooledMessage(len(data), data=data),
        headers=headers,
        body_offset=offset,
        run_in_thread=lambda work: succeed(work()),
        info=inspect_message(io.BytesIO(data), MimeLimits()),
    )


class PluginCase(SynchronousTestCase):
    """Puts directories on sys.path for one test and takes them (and what was imported from them) away."""

    def on_path(self, directory: str) -> None:
        sys.path.insert(0, directory)
        importlib.invalidate_caches()

        def restore() -> None:
            sys.path.remove(directory)
            for name in [m for m in sys.modules if m.startswith(TEST_MODULES)]:
                del sys.modules[name]
            importlib.invalidate_caches()

        self.addCleanup(restore)

    def use_examples(self) -> None:
        self.on_path(EXAMPLES)

    def write_module(self, name: str, source: str) -> None:
        """A module ``name`` importable for this test."""
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, f"{name}.py"), "w") as f:
            f.write(textwrap.dedent(source))
        self.on_path(directory)

    def register_entry_points(self, text: str) -> None:
        """An installed distribution, as far as importlib.metadata can tell, declaring ``text`` (the body of
        its entry_points.txt)."""
        directory = self.mktemp()
        info = os.path.join(directory, "dcrouter_example_plugins-0.1.0.dist-info")
        os.makedirs(info)
        with open(os.path.join(info, "METADATA"), "w") as f:
            f.write("Metadata-Version: 2.1\nName: dcrouter-example-plugins\nVersion: 0.1.0\n")
        with open(os.path.join(info, "entry_points.txt"), "w") as f:
            f.write(textwrap.dedent(text))
        self.on_path(directory)

    def config_errors(self, raw: dict[str, Any]) -> list[str]:
        with self.assertRaises(ConfigError) as caught:
            load_options(raw)
        return caught.exception.errors


class DottedPathTests(PluginCase):
    def setUp(self) -> None:
        self.use_examples()

    def test_colon_and_dot_forms(self) -> None:
        from dcrouter_example_plugins.keyword import KeywordScanner
        from dcrouter_example_plugins.subject import SubjectTag

        self.assertIs(plugins.resolve("scanner", KEYWORD), KeywordScanner)
        self.assertIs(
            plugins.resolve("scanner", "dcrouter_example_plugins.keyword.KeywordScanner"), KeywordScanner
        )
        self.assertIs(plugins.resolve("transformation", SUBJECT_TAG), SubjectTag)

    def test_built_from_configuration(self) -> None:
        from dcrouter_example_plugins.keyword import KeywordScanner
        from dcrouter_example_plugins.subject import SubjectTag

        config = load_options(keyword_config(caseSensitive=True)).options.smtp_config
        assert config is not None
        chain = build_chain(config, Clock())
        [stage] = chain.scanners
        [transformation] = chain.transformations
        self.assertTrue(verifyObject(IScanner, stage.scanner))
        self.assertTrue(verifyObject(ITransformation, transformation))
        self.assertEqual((stage.name, stage.action, stage.on_error), ("keyword", "reject", "tempfail"))
        assert isinstance(stage.scanner, KeywordScanner) and isinstance(transformation, SubjectTag)
        self.assertEqual(stage.scanner.words, ("viagra", "wire transfer"))
        self.assertEqual(transformation.prefix, "[EXTERNAL] ")

    def test_options_reach_the_plugin_as_its_schema(self) -> None:
        from dcrouter_example_plugins.keyword import KeywordOptions

        entry = ScannerConfig(type=KEYWORD, options={"words": ["viagra"]})
        report = Report()
        loaded = plugins.load_options(plugins.resolve("scanner", KEYWORD), entry.options, "options", report)
        self.assertEqual((report.errors, report.warnings), ([], []))
        self.assertEqual(loaded, KeywordOptions(words=["viagra"], case_sensitive=False))
        scanner = plugins.instantiate("scanner", entry)
        self.assertEqual(scanner.words, ("viagra",))


class EntryPointTests(PluginCase):
    def setUp(self) -> None:
        self.use_examples()
        self.register_entry_points(
            """
            [dcrouter.scanners]
            keyword = dcrouter_example_plugins.keyword:KeywordScanner
            missing = plugin_fixture_absent.nowhere:Scanner

            [dcrouter.transformations]
            subject-tag = dcrouter_example_plugins.subject:SubjectTag
            """
        )

    def test_names_resolve(self) -> None:
        from dcrouter_example_plugins.keyword import KeywordScanner
        from dcrouter_example_plugins.subject import SubjectTag

        self.assertIs(plugins.resolve("scanner", "keyword"), KeywordScanner)
        self.assertIs(plugins.resolve("transformation", "subject-tag"), SubjectTag)

    def test_a_name_belongs_to_its_group(self) -> None:
        """subject-tag is a transformation's entry point: as a scanner type it names nothing."""
        errors = self.config_errors(
            smtp(contentScanning=True, scanners=[{"type": "subject-tag", "options": {"prefix": "x "}}])
        )
        self.assertEqual(
            errors,
            [
                (
                    "smtpConfig.scanners[0].type: unknown scanner type 'subject-tag': not built in, "
                    "no entry point 'subject-tag' in group 'dcrouter.scanners', "
                    "and not a dotted path (package.module:Class)"
                )
            ],
        )

    def test_an_entry_point_that_cannot_load(self) -> None:
        errors = self.config_errors(smtp(contentScanning=True, scanners=[{"type": "missing"}]))
        self.assertEqual(
            errors,
            [
                (
                    "smtpConfig.scanners[0].type: cannot load scanner plugin 'missing': ModuleNotFoundError: "
                    "No module named 'plugin_fixture_absent'"
                )
            ],
        )

    def test_names_in_configuration_process_mail(self) -> None:
        raw = smtp(
            contentScanning=True,
            scanners=[{"type": "keyword", "options": {"words": ["viagra"]}}],
            transformations=[{"type": "subject-tag", "options": {"prefix": "[EXTERNAL] "}}],
        )
        config = load_options(raw).options.smtp_config
        assert config is not None
        clock = Clock()
        queue = MemoryQueue(clock=clock)
        self.addCleanup(queue.save)
        processor = EmailProcessor(queue, clock.seconds, **build_chain(config, clock).options())
        envelope = Envelope("alice@senders.test", ["bob@example.com"])
        refused = self.failureResultOf(
            processor.process(envelope, SpooledMessage(0, data=message("Cheap Viagra"))), Refusal
        )
        self.assertEqual(
            refused.value.reply, Reply(550, "5.7.1", "Message refused by policy (keyword viagra)")
        )
        item = self.successResultOf(processor.process(envelope, SpooledMessage(0, data=message("Lunch?"))))
        self.assertEqual(item.head.split(b"\r\n")[2], b"Subject: [EXTERNAL] Lunch?")


class ConfigErrorTests(PluginCase):
    def setUp(self) -> None:
        self.use_examples()

    def scanner_errors(self, entry: dict[str, Any]) -> list[str]:
        return self.config_errors(smtp(contentScanning=True, scanners=[entry]))

    def test_unknown_type(self) -> None:
        self.assertEqual(
            self.scanner_errors({"type": "keywrod", "options": {"words": ["x"]}}),
            [
                (
                    "smtpConfig.scanners[0].type: unknown scanner type 'keywrod': not built in, "
                    "no entry point 'keywrod' in group 'dcrouter.scanners', "
                    "and not a dotted path (package.module:Class)"
                )
            ],
        )

    def test_missing_module(self) -> None:
        self.assertEqual(
            self.scanner_errors({"type": "plugin_fixture_absent:Scanner"}),
            [
                (
                    "smtpConfig.scanners[0].type: cannot load scanner plugin "
                    "'plugin_fixture_absent:Scanner': ModuleNotFoundError: "
                    "No module named 'plugin_fixture_absent'"
                )
            ],
        )

    def test_missing_class(self) -> None:
        self.assertEqual(
            self.scanner_errors({"type": "dcrouter_example_plugins.keyword:KeywordScaner"}),
            [
                (
                    "smtpConfig.scanners[0].type: cannot load scanner plugin "
                    "'dcrouter_example_plugins.keyword:KeywordScaner': AttributeError: module "
                    "'dcrouter_example_plugins.keyword' has no attribute 'KeywordScaner'"
                )
            ],
        )

    def test_module_that_raises_on_import(self) -> None:
        self.write_module("plugin_fixture_raises", RAISES_ON_IMPORT)
        self.assertEqual(
            self.scanner_errors({"type": "plugin_fixture_raises:Scanner"}),
            [
                (
                    "smtpConfig.scanners[0].type: cannot load scanner plugin "
                    "'plugin_fixture_raises:Scanner': RuntimeError: plugin fixture exploded"
                )
            ],
        )

    def test_class_of_the_other_interface(self) -> None:
        errors = self.config_errors(
            smtp(
                contentScanning=True,
                scanners=[{"type": SUBJECT_TAG, "options": {"prefix": "x "}}],
                transformations=[{"type": KEYWORD, "options": {"words": ["x"]}}],
            )
        )
        self.assertEqual(
            errors,
            [
                (
                    f"smtpConfig.scanners[0].type: scanner plugin {SUBJECT_TAG!r} "
                    "is not a class implementing IScanner"
                ),
                (
                    f"smtpConfig.transformations[0].type: transformation plugin {KEYWORD!r} is not a class "
                    "implementing ITransformation"
                ),
            ],
        )

    def test_not_a_class(self) -> None:
        self.write_module("plugin_fixture_no_schema", NO_SCHEMA)
        self.assertEqual(
            self.scanner_errors({"type": "plugin_fixture_no_schema:not_a_class"}),
            [
                (
                    "smtpConfig.scanners[0].type: scanner plugin 'plugin_fixture_no_schema:not_a_class' "
                    "is not a class implementing IScanner"
                )
            ],
        )

    def test_missing_required_option(self) -> None:
        self.assertEqual(
            self.scanner_errors({"type": KEYWORD, "options": {"caseSensitive": True}}),
            ["smtpConfig.scanners[0].options.words: required"],
        )
        self.assertEqual(
            self.scanner_errors({"type": KEYWORD}), ["smtpConfig.scanners[0].options.words: required"]
        )

    def test_wrong_types(self) -> None:
        self.assertEqual(
            self.scanner_errors({"type": KEYWORD, "options": {"words": "viagra", "caseSensitive": "yes"}}),
            [
                "smtpConfig.scanners[0].options.words: expected list of strings, got a string 'viagra'",
                "smtpConfig.scanners[0].options.caseSensitive: expected boolean, got a string 'yes'",
            ],
        )
        self.assertEqual(
            self.scanner_errors({"type": KEYWORD, "options": {"words": ["viagra", 7]}}),
            ["smtpConfig.scanners[0].options.words[1]: expected string, got an integer 7"],
        )

    def test_option_checks(self) -> None:
        self.assertEqual(
            self.scanner_errors({"type": KEYWORD, "options": {"words": []}}),
            ["smtpConfig.scanners[0].options.words: must not be empty"],
        )
        self.assertEqual(
            self.scanner_errors({"type": KEYWORD, "options": {"words": ["ok", "  ", "a\r\nb"]}}),
            [
                "smtpConfig.scanners[0].options.words[1]: must not be empty or only whitespace",
                (
                    "smtpConfig.scanners[0].options.words[2]: must not contain CR, LF or other control "
                    "characters: 'a\\r\\nb'"
                ),
            ],
        )

    def test_unknown_option(self) -> None:
        self.assertEqual(
            self.scanner_errors({"type": KEYWORD, "options": {"word": ["viagra"]}}),
            [
                "smtpConfig.scanners[0].options.word: unknown key; did you mean 'words'?",
                "smtpConfig.scanners[0].options.words: required",
            ],
        )

    def test_transformation_options(self) -> None:
        errors = self.config_errors(
            smtp(
                transformations=[
                    {"type": "addHeader", "header": "X-Test", "value": "1"},
                    {"type": SUBJECT_TAG},
                    {"type": SUBJECT_TAG, "options": {"prefix": "[EXT]\n"}},
                ]
            )
        )
        self.assertEqual(
            errors,
            [
                "smtpConfig.transformations[1].options.prefix: required",
                (
                    "smtpConfig.transformations[2].options.prefix: must not contain CR, LF or other control "
                    "characters: '[EXT]\\n'"
                ),
            ],
        )

    def test_options_for_a_plugin_without_schema(self) -> None:
        self.write_module("plugin_fixture_no_schema", NO_SCHEMA)
        name = "plugin_fixture_no_schema:PassScanner"
        self.assertEqual(
            self.scanner_errors({"type": name, "options": {"threshold": 5, "words": []}}),
            [
                "smtpConfig.scanners[0].options.threshold: this plugin takes no options",
                "smtpConfig.scanners[0].options.words: this plugin takes no options",
            ],
        )
        # Without options it loads and is built as Class().
        config = load_options(smtp(contentScanning=True, scanners=[{"type": name}])).options.smtp_config
        assert config is not None
        [stage] = build_chain(config, Clock()).scanners
        self.assertEqual(type(stage.scanner).__name__, "PassScanner")

    def test_keys_of_built_in_types(self) -> None:
        self.assertEqual(
            self.scanner_errors({"type": KEYWORD, "threshold": 3.0, "options": {"words": ["x"]}}),
            ["smtpConfig.scanners[0].threshold: does not apply to a plugin"],
        )

    def test_instantiate_reports_bad_options(self) -> None:
        """instantiate() checks again (an entry built in code never went through the loader)."""
        with self.assertRaises(plugins.PluginError) as caught:
            plugins.instantiate("transformation", TransformationConfig(type=SUBJECT_TAG, options={}))
        self.assertEqual(str(caught.exception), "options.prefix: required")


class KeywordScannerTests(PluginCase):
    def setUp(self) -> None:
        self.use_examples()
        from dcrouter_example_plugins.keyword import KeywordOptions, KeywordScanner

        self.options = KeywordOptions
        self.scanner_class = KeywordScanner

    def scan(self, data: bytes, *words: str, case_sensitive: bool = False) -> ScanResult:
        scanner = self.scanner_class(self.options(words=list(words), case_sensitive=case_sensitive))
        result: ScanResult = self.successResultOf(scanner.scan(make_draft(data)))
        return result

    def test_words_in_the_text(self) -> None:
        result = self.scan(
            message("Hello", "Please send a WIRE\r\n  transfer today."), "viagra", "wire transfer"
        )
        self.assertEqual(
            result,
            ScanResult(
                "keyword",
                Verdict.BLOCKED,
                reason="keyword wire transfer",
                headers=(("X-Keyword-Status", "blocked; keyword wire transfer"),),
            ),
        )

    def test_whole_words_only(self) -> None:
        result = self.scan(message("Cashews", "Cashflow, cash-like."), "cash")
        self.assertEqual((result.verdict, result.reason), (Verdict.BLOCKED, "keyword cash"))
        result = self.scan(message("Cashews", "Cashflow."), "cash")
        self.assertEqual((result.verdict, result.headers), (Verdict.CLEAN, (("X-Keyword-Status", "clean"),)))

    def test_case(self) -> None:
        data = message("VIAGRA")
        self.assertEqual(self.scan(data, "viagra").verdict, Verdict.BLOCKED)
        self.assertEqual(self.scan(data, "viagra", case_sensitive=True).verdict, Verdict.CLEAN)

    def test_decoded_subject(self) -> None:
        result = self.scan(message("=?utf-8?q?Cr=C3=A8me_br=C3=BBl=C3=A9e?="), "brûlée")
        self.assertEqual((result.verdict, result.reason), (Verdict.BLOCKED, "keyword brûlée"))

    def test_decoded_body(self) -> None:
        data = message(
            "Hello",
            "V2lyZSB0cmFuc2ZlciBuZWVkZWQ=",
            "MIME-Version: 1.0",
            "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: base64",
        )
        self.assertEqual(self.scan(data, "wire transfer").reason, "keyword wire transfer")

    def test_unscannable_is_not_clean(self) -> None:
        data = message(
            "Hello",
            "--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n",  # the close-delimiter never comes
            "MIME-Version: 1.0",
            'Content-Type: multipart/mixed; boundary="b"',
        )
        result = self.scan(data, "viagra")
        self.assertEqual(result.verdict, Verdict.UNSCANNABLE)
        self.assertTrue(result.reason)
        # A word that is seen still blocks.
        self.assertEqual(self.scan(data, "hi").verdict, Verdict.BLOCKED)

    def test_scan_runs_in_the_drafts_thread(self) -> None:
        """The text search is handed to run_in_thread; the verdict comes when that work is done."""
        draft = make_draft(message("Viagra"))
        pending: list[tuple[Deferred[Any], Any]] = []

        def later(work: Any) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            pending.append((d, work))
            return d

        draft.run_in_thread = later
        found = self.scanner_class(self.options(words=["viagra"])).scan(draft)
        self.assertNoResult(found)
        d, work = pending.pop()
        d.callback(work())
        self.assertEqual(self.successResultOf(found).verdict, Verdict.BLOCKED)


class SubjectTagTests(PluginCase):
    def setUp(self) -> None:
        self.use_examples()
        from dcrouter_example_plugins.subject import SubjectTag, SubjectTagOptions

        self.tag = SubjectTag(SubjectTagOptions(prefix="[EXTERNAL] "))

    def subject_after(self, data: bytes) -> str:
        draft = make_draft(data)
        self.tag.apply(draft)
        parsed = email.message_from_bytes(draft.headers.to_bytes(), policy=email.policy.default)
        return str(parsed["Subject"])

    def test_prefix(self) -> None:
        self.assertEqual(self.subject_after(message("Lunch?")), "[EXTERNAL] Lunch?")

    def test_not_twice(self) -> None:
        draft = make_draft(message("[EXTERNAL] Lunch?"))
        self.tag.apply(draft)
        self.assertFalse(draft.headers.changed)

    def test_encoded_subject(self) -> None:
        self.assertEqual(self.subject_after(message("=?iso-8859-1?q?Caf=E9?=")), "[EXTERNAL] Café")

    def test_no_injection_through_encoded_words(self) -> None:
        """An encoded-word may decode to CR LF; the new value must not carry it into the header block."""
        draft = make_draft(message("=?utf-8?q?a=0D=0ABcc:_eve@evil.test?="))
        self.tag.apply(draft)
        self.assertEqual(draft.headers.names(), ["From", "To", "Subject"])
        self.assertEqual(draft.headers.get("Subject"), "[EXTERNAL] a Bcc: eve@evil.test")

    def test_no_subject(self) -> None:
        data = b"From: alice@senders.test\r\n\r\nhi\r\n"
        self.assertEqual(self.subject_after(data), "[EXTERNAL]")


class ChainTests(PluginCase):
    """The plugins in the processor as dcrouter builds it from a configuration."""

    def setUp(self) -> None:
        self.use_examples()
        self.clock = Clock()
        self.clock.advance(START)
        self.queue = MemoryQueue(clock=self.clock)
        self.addCleanup(self.queue.save)

    def processor(self, raw: dict[str, Any]) -> EmailProcessor:
        config = load_options(raw).options.smtp_config
        assert config is not None
        return EmailProcessor(self.queue, self.clock.seconds, **build_chain(config, self.clock).options())

    def send(self, processor: EmailProcessor, data: bytes) -> Deferred[QueueItem]:
        envelope = Envelope("alice@senders.test", ["bob@example.com"], received_at=self.clock.seconds())
        return processor.process(envelope, SpooledMessage(len(data), data=data))

    def stored(self, item: QueueItem) -> bytes:
        stream = self.successResultOf(self.queue.open_body(item.id))
        with message_reader(item.head, stream, item.body_offset) as composed:
            return composed.read()

    def count(self) -> int:
        count: int = self.successResultOf(self.queue.get_item_count())
        return count

    def test_reject(self) -> None:
        processor = self.processor(keyword_config("reject"))
        refused = self.failureResultOf(self.send(processor, message("Hi", "Buy VIAGRA now")), Refusal)
        self.assertEqual(
            refused.value.reply, Reply(550, "5.7.1", "Message refused by policy (keyword viagra)")
        )
        self.assertEqual(self.count(), 0)
        self.assertEqual(processor.stats["refused"], 1)

    def test_clean_mail_is_tagged_and_queued(self) -> None:
        processor = self.processor(keyword_config("reject"))
        data = message("Lunch?", "At noon, as usual.")
        item = self.successResultOf(self.send(processor, data))
        head, body = data.split(b"\r\n\r\n", 1)
        # The scanner's status (mail it passes carries it whatever the action), and the new Subject in place.
        expected = head.replace(b"Lunch?", b"[EXTERNAL] Lunch?") + b"\r\nX-Keyword-Status: clean\r\n\r\n"
        self.assertEqual(self.stored(item), expected + body)
        # A header-only change: the new block is stored, the received file is relayed from its body on.
        self.assertEqual((item.head, item.body_offset), (expected, len(head) + 4))

    def test_case_sensitive(self) -> None:
        processor = self.processor(keyword_config("reject", caseSensitive=True))
        self.successResultOf(self.send(processor, message("Hi", "Buy VIAGRA now")))
        self.failureResultOf(self.send(processor, message("Hi", "Buy viagra now")), Refusal)

    def test_tag(self) -> None:
        processor = self.processor(keyword_config("tag"))
        data = message("Hi", "Buy viagra now", "X-Keyword-Status: clean")
        item = self.successResultOf(self.send(processor, data))
        parsed = email.message_from_bytes(self.stored(item), policy=email.policy.default)
        # The sender's own status field is replaced, not kept next to the scanner's.
        self.assertEqual(parsed.get_all("X-Keyword-Status"), ["blocked; keyword viagra"])
        self.assertEqual(parsed["Subject"], "[EXTERNAL] Hi")

    def test_quarantine(self) -> None:
        processor = self.processor(keyword_config("quarantine"))
        item = self.successResultOf(self.send(processor, message("Hi", "Buy viagra now")))
        self.assertEqual(item.status, QueueItemStatus.QUARANTINED)
        self.assertEqual(item.last_error, "keyword: blocked (keyword viagra)")

    def test_discard(self) -> None:
        processor = self.processor(keyword_config("discard"))
        dropped = self.failureResultOf(self.send(processor, message("Hi", "Buy viagra now")), Discarded)
        self.assertEqual(dropped.value.reason, "keyword: keyword viagra")
        self.assertEqual(self.count(), 0)

    def test_scanner_unavailable(self) -> None:
        self.write_module("plugin_fixture_unavailable", UNAVAILABLE)
        entry = {"type": "plugin_fixture_unavailable:DownScanner"}
        processor = self.processor(smtp(contentScanning=True, scanners=[entry]))
        refused = self.failureResultOf(self.send(processor, message("Hi")), Refusal)
        self.assertEqual(
            refused.value.reply, Reply(451, "4.7.0", "Content scanner down unavailable, try again later")
        )
        processor = self.processor(smtp(contentScanning=True, scanners=[{**entry, "onError": "accept"}]))
        self.successResultOf(self.send(processor, message("Hi")))
        self.assertEqual(self.count(), 1)
