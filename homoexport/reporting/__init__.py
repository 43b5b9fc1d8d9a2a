"""One readable report (markdown + plots) from the JSON reports of runs."""
