-- ckptvault catalog, schema version 1. Derived data: manifests are the truth; `ckptvault catalog
-- rebuild ROOT` recreates it. Paths are relative to the catalog's root, with "/" separators.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dirs (
    path TEXT PRIMARY KEY,          -- a scanned directory that is not a checkpoint ("" = the root)
    mtime_ns INTEGER NOT NULL,      -- its mtime when it was last listed (-1: list again next time)
    is_run INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS runs (
    run_dir TEXT PRIMARY KEY,       -- directory holding checkpoints
    run_id TEXT,
    config_json TEXT,
    git_commit TEXT,
    data_version TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    id INTEGER PRIMARY KEY,
    path TEXT NOT NULL UNIQUE,      -- run_dir + "/" + name
    run_dir TEXT NOT NULL,
    name TEXT NOT NULL,
    checkpoint_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    epoch INTEGER,
    scope TEXT,
    created_at TEXT NOT NULL,       -- ISO 8601 UTC, compares as text
    size_bytes INTEGER NOT NULL,
    tensor_bytes INTEGER NOT NULL,
    num_tensors INTEGER NOT NULL,
    run_id TEXT,
    git_commit TEXT,
    config_json TEXT,
    validation_level TEXT,
    validation_passed INTEGER,      -- 1, 0 or NULL (not validated)
    manifest_mtime_ns INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS checkpoints_run ON checkpoints (run_dir, step);
CREATE INDEX IF NOT EXISTS checkpoints_step ON checkpoints (step);
CREATE TABLE IF NOT EXISTS metrics (
    checkpoint INTEGER NOT NULL REFERENCES checkpoints (id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    value REAL,                     -- NULL for NaN
    PRIMARY KEY (checkpoint, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS metrics_name_value ON metrics (name, value);
CREATE TABLE IF NOT EXISTS config (
    checkpoint INTEGER NOT NULL REFERENCES checkpoints (id) ON DELETE CASCADE,
    key TEXT NOT NULL,              -- dotted path into the config ("optimizer.lr")
    value TEXT,                     -- the value as JSON text
    num REAL,                       -- the value when it is a number, else NULL
    PRIMARY KEY (checkpoint, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS config_key ON config (key, num);
CREATE TABLE IF NOT EXISTS tags (
    checkpoint INTEGER NOT NULL REFERENCES checkpoints (id) ON DELETE CASCADE,
    key TEXT NOT NULL,
    value TEXT,
    PRIMARY KEY (checkpoint, key)
) WITHOUT ROWID;
