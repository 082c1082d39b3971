#!/bin/sh
# Run in the build stage: when the context carried a vendored copy of the crates
# (`cargo vendor --locked docker/deps/vendor`), point cargo at it and forbid the network.
set -eu
if [ -d docker/deps/vendor ]; then
    mkdir -p .cargo
    cat > .cargo/config.toml <<'TOML'
[source.crates-io]
replace-with = "vendored-sources"

[source.vendored-sources]
directory = "docker/deps/vendor"

[net]
offline = true
TOML
    echo "cargo-source: using the vendored crates in docker/deps/vendor, offline"
else
    echo "cargo-source: fetching crates from crates.io"
fi
