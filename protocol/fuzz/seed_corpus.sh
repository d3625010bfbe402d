#!/bin/sh
# Seeds corpus/decode from the golden vectors in ../wire/tests/golden.txt: every valid frame
# alone (with both seed bytes: default limit and the small 64-byte limit), every invalid input,
# and all valid frames back to back. libFuzzer mutates from these instead of from nothing.
set -eu
cd "$(dirname "$0")"
out=corpus/decode
mkdir -p "$out"
all=""
for file in ../wire/tests/golden.txt ../wire/tests/golden_invalid.txt; do
    grep -v '^#' "$file" | grep -v '^[[:space:]]*$' | while IFS='|' read -r name _ hex; do
        name=$(echo "$name" | tr -d ' ')
        hex=$(echo "$hex" | tr -d ' ')
        printf '00%s' "$hex" | perl -ne 'print pack("H*", $_)' > "$out/golden-$name"
        printf '01%s' "$hex" | perl -ne 'print pack("H*", $_)' > "$out/golden-$name-small-limit"
    done
done
grep -v '^#' ../wire/tests/golden.txt | grep -v '^[[:space:]]*$' | cut -d'|' -f3 | tr -d ' \n' \
    | sed 's/^/02/' | perl -ne 'print pack("H*", $_)' > "$out/golden-all-valid"
echo "seeded $(ls "$out" | wc -l) inputs into $out"
