"""The embedded default, built from code: the tiny VLM (`tiny_model`), its grid-counting tasks (`tasks`) and worked
chains (`chains`), and text word problems for text models (`word_problems`). Users' own models and data skip this."""
