"""Thin Typer command lines over mllm_dr (and, for federation, fl_client / fl_server)."""
