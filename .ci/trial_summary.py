"""Turn trial's closing line into the one CI reads: "N passed, N failed, N skipped"."""

import re
import sys


def main(path: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as log:
        lines = log.read().splitlines()
    closing = next((line for line in reversed(lines) if re.match(r"^(PASSED|FAILED) \(", line)), None)
    if closing is None:
        print("0 passed, 1 failed")  # trial never finished: an import error or a crash
        return 1
    counts = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", closing))
    passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
    failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
    print(f"{passed} passed, {failed} failed, {counts.get('skips', 0)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
