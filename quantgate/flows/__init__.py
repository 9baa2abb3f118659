"""Prefect flows (orchestration only). Importing them masks credentials in every log record of the process: a worker
imports this package to run a flow, and Prefect ships log records to its API and UI."""

from quantgate.redact import install

install()
