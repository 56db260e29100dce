"""After the run: energy attribution, per-cell metrics, summary, figures, report."""
