"""What a run reports: the summary, plots, diagnostics, report page, model card and comparisons."""
