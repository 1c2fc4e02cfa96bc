#!/usr/bin/env bash
# Fetch the jars of a single-node Apache Kafka broker (KRaft) from Maven Central.
#
#   bash tools/kafka/fetch.sh        # prints the libs directory on stdout (last line)
#
# Jars go to $METERLINE_KAFKA_HOME/libs, default <repo>/.cache/kafka/<version>/libs.
# Idempotent and cached: when that directory holds the jars and a stamp matching
# tools/kafka/pom.xml, it exits at once. Otherwise it runs Maven (local repository
# ~/.m2, or whatever MAVEN_OPTS / settings.xml say) and replaces the directory whole,
# so an interrupted fetch never leaves a half-filled libs/ that looks complete.
# If METERLINE_KAFKA_HOME points at an unpacked Kafka distribution (libs/ with the
# kafka_2.13 jar but no stamp), that is used as is and nothing is fetched.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
pom="$here/pom.xml"
plugin="org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom" | head -n1)"
if [[ -z "$version" ]]; then
    echo "fetch.sh: no <kafka.version> in $pom" >&2
    exit 1
fi

home="${METERLINE_KAFKA_HOME:-$repo_root/.cache/kafka/$version}"
libs="$home/libs"
stamp="$home/.fetched"
want="kafka=$version pom=$(sha256sum "$pom" | cut -d' ' -f1)"

have_jars() { compgen -G "$libs/kafka_2.13-*.jar" >/dev/null; }
is_fresh() { have_jars && [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; }

if is_fresh; then
    echo "$libs"
    exit 0
fi
if [[ -n "${METERLINE_KAFKA_HOME:-}" && ! -f "$stamp" ]] && have_jars; then
    echo "fetch.sh: using the Kafka jars already in $libs (no stamp: not fetched here)" >&2
    echo "$libs"
    exit 0
fi

for tool in mvn java; do
    if ! command -v "$tool" >/dev/null; then
        echo "fetch.sh: '$tool' is not on PATH; Kafka's jars come from Maven Central via mvn" >&2
        exit 1
    fi
done

mkdir -p "$home"
# One fetch at a time (parallel test runs may all call this on a cold cache).
exec 9>"$home/.fetch.lock"
flock 9
if is_fresh; then   # another process finished the fetch while we waited
    echo "$libs"
    exit 0
fi

echo "fetch.sh: resolving Kafka $version jars with Maven into $libs ..." >&2
tmp="$(mktemp -d "$home/.libs.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
mvn_log="$home/.fetch-mvn.log"
# Runtime scope = everything `java -cp libs/*` needs. Maven's output is kept in a log
# and shown only when it fails.
if ! mvn -q -B -ntp -Dstyle.color=never -f "$pom" "$plugin:copy-dependencies" \
        -DincludeScope=runtime \
        -DoutputDirectory="$tmp" \
        -DoverWriteReleases=true >"$mvn_log" 2>&1; then
    cat "$mvn_log" >&2
    echo "fetch.sh: mvn failed (log: $mvn_log)" >&2
    exit 1
fi

if ! compgen -G "$tmp/kafka_2.13-$version.jar" >/dev/null; then
    echo "fetch.sh: Maven finished but kafka_2.13-$version.jar is missing from $tmp" >&2
    exit 1
fi

rm -rf "$libs" "$stamp"
mv "$tmp" "$libs"
trap - EXIT
echo "$want" >"$stamp"
echo "fetch.sh: $(find "$libs" -name '*.jar' | wc -l) jars, $(du -sh "$libs" | cut -f1) in $libs" >&2
echo "$libs"
