"""Accounts, persons, bearer tokens, resident ID numbers and rate limits."""
