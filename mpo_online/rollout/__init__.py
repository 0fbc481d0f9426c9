"""A round's rollouts on Ray Data: prompts -> served samples -> verified -> pairs (`pipeline.run_round`), and the
files and statistics the round leaves behind (`outputs`)."""
