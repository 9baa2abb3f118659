"""Every name quantgate writes into MLflow, owned here and imported everywhere else: tag keys, artifact paths and the
prefix of quantgate's line in a source version's description.

Users search and script against these (README, "What lands in MLflow"), and runs of older quantgate versions carry
them, so renaming one is a breaking change.
"""

from __future__ import annotations

PREFIX = "quantgate."


def tag(key: str) -> str:
    """quantgate's tag ``key`` (``quantgate.<key>``)."""
    return PREFIX + key


# -- tags a user (or the demo) sets on a source version: where its data is
CALIBRATION = tag("calibration")
EVALUATION = tag("evaluation")
DATA_TAGS = {"calibration": CALIBRATION, "evaluation": EVALUATION}

# -- source version tags, written by a run (OUTCOME last: it is the registration's commit)
OUTCOME = tag("outcome")  # promoted, none_passed, failed
SUMMARY = tag("summary")
COMPRESSED_URI = tag("compressed_uri")
LAST_RUN_ID = tag("last_run_id")
POLICY_HASH = tag("policy_hash")
BACKEND_VERSIONS = tag("backend_versions")
FAILURE = tag("failure")  # input, infrastructure, internal
# What a run may overwrite on a source version (saved before, restored by a rollback), the commit excluded.
SOURCE_TAGS = (SUMMARY, COMPRESSED_URI, LAST_RUN_ID, POLICY_HASH, BACKEND_VERSIONS, FAILURE)

# -- lineage of a registered compressed version (and of its registered model: MANAGED)
MANAGED = tag("managed")
SOURCE_NAME = tag("source_name")
SOURCE_VERSION = tag("source_version")
SOURCE_URI = tag("source_uri")
SOURCE_RUN_ID = tag("source_run_id")
BACKEND = tag("backend")
RECIPE = tag("recipe")
RECIPE_HASH = tag("recipe_hash")
CANDIDATE_RUN_ID = tag("candidate_run_id")
HARDWARE = tag("hardware")  # the fingerprint
CPU = tag("cpu")
ISA = tag("isa")
LIBRARIES = tag("libraries")
METRIC_PREFIX = tag("metric.")  # quantgate.metric.<name>: the headline figures, searchable
# The metrics a registered version carries as tags.
TAGGED_METRICS = ("speedup", "speedup_ci_low", "size_ratio", "accuracy_drop", "fidelity", "latency_p50_ms")

# -- run tags: the parent run of a compression and its candidates' child runs
PASSED = tag("passed")
PROMOTED = tag("promoted")
STATUS = tag("status")
PROMOTED_URI = tag("promoted_uri")
SERVING_ERROR = tag("serving_error")
REPORT_ERROR = tag("report_error")
JOURNAL = tag("registration")
JOURNAL_STATE = tag("registration_state")  # open, committed, rolled_back: searchable without parsing the journal
OWNER = tag("owner")
HEARTBEAT = tag("heartbeat")
ORPHANED = tag("orphaned")

# -- artifacts
RESULT = "result.json"  # parent run: the result document
POLICY = "policy.json"  # parent run: the policy as run
CANDIDATE_REPORT = "report.json"  # child run: the candidate's full record
BEFORE = "registration/before.json"  # parent run: what the registration may overwrite
STEPS_DIR = "steps"  # parent run: steps/<pool>.json, what a target pool's step measured
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
COMPARISON_TABLE = "comparison_table.json"
PLOTS_DIR = "plots"
PLOTS = ("latency", "tradeoff", "sizes")  # plots/<name>.png
REPORT_FILES = (REPORT_MD, REPORT_HTML, COMPARISON_TABLE, *(f"{PLOTS_DIR}/{p}.png" for p in PLOTS))


def step_artifact(pool: str) -> str:
    """Where a target pool's step leaves its results on the parent run."""
    return f"{STEPS_DIR}/{pool}.json"


# The source version's description: quantgate's one line starts with this, and is replaced run after run.
DESCRIPTION_PREFIX = "quantgate: "
