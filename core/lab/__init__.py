"""The lab: a toy world where backdoors are real, trained and measured."""
