"""Tables for the scripts' reports: aligned plain text for the terminal, Markdown for the docs,
and the CPU model for the machine line."""


def text_table(rows):
    """`rows` (the header first, lists of strings) as left-aligned columns two spaces apart,
    with a line of dashes under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(header, rows, right_aligned=()):
    """A Markdown table; "|" in a cell is escaped and a newline becomes a space. Columns whose
    index is in `right_aligned` are aligned right."""

    def cell(text):
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |"]
    lines.append(
        "|" + "|".join("---:" if i in right_aligned else "---" for i in range(len(header))) + "|"
    )
    lines.extend("| " + " | ".join(cell(c) for c in row) + " |" for row in rows)
    return "\n".join(lines)


def cpu_model(unknown):
    """The CPU's model name from /proc/cpuinfo, else `unknown`."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return unknown
