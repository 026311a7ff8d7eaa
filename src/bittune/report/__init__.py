"""``bittune report RUN_DIR``: one Markdown file and one self-contained HTML page about a run.

:mod:`~bittune.report.collect` measures (base, tuned, and any ``--compare`` models on the same data and prompts),
:mod:`~bittune.report.plots` draws the PNGs, :mod:`~bittune.report.render` writes ``report.md`` / ``report.html``.
"""
