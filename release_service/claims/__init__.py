"""The claim: its path from request to answer, and what each refusal answers."""
