"""What flows between the stages: the prompt schema and its readers (`prompts`: any parquet/JSONL prompt set -> valid
rows + a quarantine file) and the typed records (`records`: Rollout, PreferencePair, ... and their Arrow form)."""
