"""Gathers every experiment's summary and figures into one ``REPORT.md``."""

from __future__ import annotations

import json
import re
from pathlib import Path

from jaxopt_lab.lab import results
from jaxopt_lab.lab.experiment import CANONICAL_ORDER

__all__ = ["write_report"]

# Markdown images/links to a bare relative file (no scheme, no leading slash).
_LOCAL_LINK = re.compile(r"(!?\[[^\]]*\]\()(?![a-z]+://|/|#)([^)\s]+)\)")


def _experiment_dirs(out: Path) -> list[Path]:
    dirs = [p.parent for p in out.glob("*/summary.md") if not p.parent.name.startswith(".")]
    rank = {name: i for i, name in enumerate(CANONICAL_ORDER)}
    return sorted(dirs, key=lambda d: (rank.get(d.name, len(rank)), d.name))


def _rebase_links(text: str, folder: str) -> str:
    """A summary's links to its own files, made relative to the results folder (``folder/file``)."""
    return _LOCAL_LINK.sub(lambda m: f"{m.group(1)}{folder}/{m.group(2)})", text)


def write_report(out: str | Path = "results") -> Path:
    """Writes ``out/REPORT.md`` from every ``out/*/summary.md`` and returns its path.

    Relative links in a summary are re-rooted at the experiment's folder, and figures that a summary
    does not show itself are appended under it, so the report shows every figure that was written.

    Raises:
      FileNotFoundError: no experiment results under ``out`` (or no such folder).
      NotADirectoryError: ``out`` is a file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"report: {out} is a file; expected the results folder of `jaxopt-lab run`")
    dirs = _experiment_dirs(out)
    if not dirs:
        raise FileNotFoundError(f"report: no experiment results under {out}/ (run `jaxopt-lab run` first)")
    rows, sections = [], []
    for d in dirs:
        meta = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").exists() else {}
        env = meta.get("environment", {})
        rows.append(f"| [{d.name}](#{d.name}) | {'quick' if meta.get('quick') else 'full'} | "
                    f"{meta.get('seed', '?')} | {meta.get('elapsed_s', float('nan')):.1f} | "
                    f"{env.get('device_kind', '?')} |")
        text = (d / "summary.md").read_text()
        text = _rebase_links(text, d.name)
        # Demote the summary's headings one level so the report keeps a single title.
        text = re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)
        shown = set(re.findall(rf"{re.escape(d.name)}/([^)\s]+\.png)", text))
        extra = [f"![{p.name}]({d.name}/{p.name})" for p in sorted(d.glob("*.png"))
                 if p.name not in shown]
        sections.append(f'<a id="{d.name}"></a>\n\n{text.strip()}\n' +
                        ("\n" + "\n\n".join(extra) + "\n" if extra else ""))
    body = ("# jaxopt_lab report\n\n"
            "| experiment | mode | seed | seconds | device |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\n" + "\n\n".join(sections))
    return results.atomic_write_text(out / "REPORT.md", body)
