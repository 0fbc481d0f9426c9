"""A run's own files and views of them: the run directory and resume (`state`), the console (`console`), component
logs (`logs`), summary and report (`report`), rendered results tables (`results`) and the machine (`machine`)."""
