"""The bench's output: the text table, the Markdown table and the machine's description."""

import os
import platform

from maxage_tools import report
from maxage_tools.bench.model import ROW_TITLES

UNIT_FORMATS = {"req/s": "{:,.0f}", "us": "{:.2f}", "ms": "{:.2f}", "s": "{:.3f}", "B": "{:.1f}"}


def format_number(value, unit):
    if value is None:
        return "-"
    return UNIT_FORMATS.get(unit, "{:g}").format(value) + (f" {unit}" if unit else "")


def table_cells(figure):
    if figure.compare == "ratio":
        value = "-" if figure.value is None else f"{figure.value:.3f}"
        floor = "-" if figure.floor is None else f"±{figure.floor:.3f}"
    elif figure.compare == "diff":
        value = "-" if figure.value is None else f"{figure.value:+.2f} {figure.unit}"
        floor = "-" if figure.floor is None else f"±{figure.floor:.2f} {figure.unit}"
    else:
        value = "-" if figure.value is None else format_number(figure.value, figure.unit)
        floor = "-" if figure.floor is None else f"±{figure.floor:.2f} {figure.unit}"
    goal = "-" if figure.goal_op is None else f"{figure.goal_op} {figure.goal:g}"
    if figure.goal_op is not None and figure.compare == "diff":
        goal += f" {figure.unit}"
    if figure.goal_op is not None and figure.compare == "value":
        goal += f" {figure.unit}"
    baseline = format_number(figure.baseline, figure.unit)
    return [
        f"{figure.row}. {ROW_TITLES[figure.row]}",
        figure.figure,
        format_number(figure.module, figure.unit),
        baseline,
        value,
        floor,
        goal,
        figure.verdict,
    ]


HEADER = ["row", "figure", "module", "baseline", "ratio / diff", "A/A floor", "goal", "verdict"]


def table(figures):
    """The header and the lines, with a server column after the row when the rows name their
    servers (a setup other than the default's)."""
    if not any(f.server for f in figures):
        return HEADER, [table_cells(f) for f in figures]
    header = [HEADER[0], "server", *HEADER[1:]]
    lines = []
    for figure in figures:
        cells = table_cells(figure)
        lines.append([cells[0], figure.server or "-", *cells[1:]])
    return header, lines


def text_table(figures):
    header, lines = table(figures)
    return report.text_table([header, *lines])


LEGEND = (
    "ratio / diff: median over rounds of module vs baseline measured in the same round. "
    "A/A floor: the same between two identical baseline servers, as distance from equal. "
    "A goal is met or not met when cleared or missed by more than the floor, else unresolved."
)


def footnotes(figures, notes):
    lines = [f"- {ROW_TITLES[f.row]}, {f.figure}: {f.note}" for f in figures if f.note]
    return lines + [f"- {note}" for note in notes]


def markdown_table(figures, notes, machine, run_line):
    out = [f"{run_line}", "", f"Machine: {machine}", ""]
    out.append(report.markdown_table(*table(figures)))
    out += ["", LEGEND, ""] + footnotes(figures, notes)
    return "\n".join(out)


def machine_description():
    return {
        "nproc": os.cpu_count(),
        "cpu": report.cpu_model("unknown CPU"),
        "kernel": f"{platform.system()} {platform.release()}",
    }
