"""Scoring and showing results: the metrics registry, the OOF report, plots and the HTML report."""
