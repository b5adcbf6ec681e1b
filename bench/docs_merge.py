"""`--merge` without the earlier raw results (bench/out is not committed): the report just
rendered is merged into the current docs/benchmarks.md as text. Its summary rows and sections
replace those of the same measurements; every other section stays as it was, dated as it was;
sections are numbered again in the suite's order."""

from __future__ import annotations

import re

_SECTION = re.compile(r"^## (\d+)\. (.+)$")


def _split(text: str) -> tuple[list[str], list[str], list[tuple[str, list[str]]], list[str]]:
    """(header lines, summary table lines, [(title, section lines)], footer lines)."""
    lines = text.splitlines()
    header: list[str] = []
    summary: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    footer: list[str] = []
    i = 0
    while i < len(lines) and lines[i] != "## Summary":
        header.append(lines[i])
        i += 1
    i += 1
    while i < len(lines) and not _SECTION.match(lines[i]):
        if lines[i].startswith("|"):
            summary.append(lines[i])
        i += 1
    while i < len(lines):
        found = _SECTION.match(lines[i])
        if found:
            sections.append((found.group(2), [lines[i]]))
        elif lines[i].startswith("Raw figures of every run"):
            footer = lines[i:]
            break
        else:
            sections[-1][1].append(lines[i])
        i += 1
    return header, summary, sections, footer


def merge_into(old: str, new: str, order: list[str]) -> str:
    """``new`` (a report of the measurements just run) merged into ``old``; ``order``: the
    suite's titles in order."""
    old_header, old_summary, old_sections, _ = _split(old)
    new_header, new_summary, new_sections, new_footer = _split(new)
    fresh = {title for title, _ in new_sections}
    date = next((line[len("- Date: ") :] for line in old_header if line.startswith("- Date: ")), "?")
    command = next((line[len("- Command: ") :] for line in old_header if line.startswith("- Command: ")), "?")
    header = list(new_header)
    while header and not header[-1].strip():
        header.pop()
    at = next((i for i, line in enumerate(header) if line.startswith("- Mode:")), len(header))
    merged = [f"- Merged from the report as it was (raw results not kept): {command} at {date}"]
    merged += [line for line in old_header if line.startswith("- Merged from")]
    header = [*header[:at], *merged, *header[at:]]
    rows = [r for r in old_summary[2:] if r.split("|")[1].strip() not in fresh] + new_summary[2:]
    rank = {title: i for i, title in enumerate(order)}
    rows.sort(key=lambda r: rank.get(r.split("|")[1].strip(), len(order)))
    sections = [s for s in old_sections if s[0] not in fresh] + new_sections
    sections.sort(key=lambda s: rank.get(s[0], len(order)))
    out = [*header, "", "## Summary", "", *new_summary[:2], *rows, ""]
    for number, (title, body) in enumerate(sections, 1):
        out.append(f"## {number}. {title}")
        out.extend(body[1:])
    out.extend(new_footer)
    return "\n".join(out).rstrip("\n") + "\n"
