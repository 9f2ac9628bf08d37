"""`make imports`: every import under server/ models/ clients/ slhf/ bench/ tests/ docs/ resolves as
an IDE resolves it, module and imported name (inside functions too). basedpyright reads the
editable install's .pth (plain folders) and the venv; only its import rules count (pyproject.toml,
[tool.basedpyright]). Exit 1 on any unresolved one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RULES = {"reportMissingImports", "reportMissingModuleSource"}
#: ``from module import name`` where the module has no such name: reported under this rule, whose
#: other findings (attribute access on values) are type checking, mypy's job
UNKNOWN_SYMBOL = ("reportAttributeAccessIssue", "is unknown import symbol")


def main() -> int:
    exe = Path(sys.executable).parent / "basedpyright"
    done = subprocess.run(
        [str(exe), "--outputjson"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        print(done.stdout, done.stderr, sep="\n", file=sys.stderr)
        return 2
    bad = [
        d
        for d in report["generalDiagnostics"]
        if d.get("rule") in RULES
        or (d.get("rule") == UNKNOWN_SYMBOL[0] and UNKNOWN_SYMBOL[1] in d["message"])
    ]
    for d in bad:
        line = d["range"]["start"]["line"] + 1
        print(f"{Path(d['file']).relative_to(REPO)}:{line}: {d['message']}", file=sys.stderr)
    files = report["summary"]["filesAnalyzed"]
    print(f"imports: {files} files, {len(bad)} unresolved")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
