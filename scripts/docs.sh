#!/usr/bin/env bash
# The manual: builds docs/ with mdBook into docs/book/ (ignored by git), then
# checks every link (scripts/linkcheck.py): each relative link of the built
# pages must lead to a page of the book and each #anchor to an id in it, and
# each relative link of README.md to a file of the repository. Fails with the
# list of broken links. Installs mdbook when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v mdbook >/dev/null 2>&1; then
    echo "installing mdbook"
    cargo install mdbook --locked --no-default-features --quiet
fi

rm -rf docs/book
# mdBook reports a missing include as an ERROR and builds anyway: any error
# or warning fails the build here.
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
mdbook build docs 2>&1 | tee "$log"
if grep -Eq '(^|[[:space:]])(ERROR|WARN)[[:space:]]' "$log"; then
    echo "mdbook build docs: errors or warnings above" >&2
    exit 1
fi
python3 scripts/linkcheck.py
