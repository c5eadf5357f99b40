#!/usr/bin/env bash
# This machine's apt entries for Debian 12 (bookworm, bookworm-updates,
# bookworm-security), read from its own apt configuration: the mirror, the
# options and the Signed-By keyring are whatever the machine already uses, so
# a build host behind a local mirror or a proxy keeps using it.
#
# Usage: scripts/debian-sources.sh deb|deb-src   the entries as deb822
#                                                 stanzas of that type
#        scripts/debian-sources.sh mirror        the archive URI that serves
#                                                 bookworm (for debootstrap and
#                                                 the archive's pool)
# Exits 1 with a message when the machine lists no Debian 12 archive.
set -euo pipefail

mode=${1:-}
case "$mode" in deb|deb-src|mirror) ;; *) echo "usage: $0 deb|deb-src|mirror" >&2; exit 2 ;; esac

# "file:N SUITE URI" of each configured binary index of Debian 12. For a
# .sources file N counts stanzas, for a one-line .list file it is the line.
targets() {
  apt-get indextargets --format '$(SOURCESENTRY) $(RELEASE) $(REPO_URI)' \
    'Created-By: Packages' 'Origin: Debian' 2>/dev/null |
    awk '$2 ~ /^bookworm(-updates|-security)?$/' | sort -u
}
list=$(targets)
if [ -z "$list" ] && [ "$(id -u)" -eq 0 ]; then
  apt-get update -q >/dev/null 2>&1 || true  # the indexes may just not be fetched yet
  list=$(targets)
fi
if [ -z "$list" ]; then
  echo "debian-sources: this machine's apt configuration lists no Debian 12 (bookworm) archive;" \
       "add one to /etc/apt/sources.list.d/ and run apt-get update" >&2
  exit 1
fi

if [ "$mode" = mirror ]; then
  uri=$(awk '$2 == "bookworm" { print $3; exit }' <<<"$list")
  [ -n "$uri" ] || { echo "debian-sources: no entry serves the bookworm suite itself" >&2; exit 1; }
  echo "${uri%/}"
  exit 0
fi

# One stanza per entry, in the type asked for; each entry once, whatever
# number of suites and components it lists.
awk '{ print $1 }' <<<"$list" | sort -u | while IFS= read -r entry; do
  file=${entry%:*} n=${entry##*:}
  case "$file" in
    *.sources)
      # Paragraph N (blank-line separated, comment-only paragraphs skipped as
      # apt skips them), Types replaced, Enabled kept as it is.
      awk -v n="$n" -v type="$mode" '
        BEGIN { RS = ""; FS = "\n" }
        { real = 0; for (i = 1; i <= NF; i++) if ($i !~ /^[ \t]*#/) real = 1 }
        real && ++k == n {
          for (i = 1; i <= NF; i++) {
            if ($i ~ /^[ \t]*#/) continue
            if (tolower($i) ~ /^types:/) print "Types: " type; else print $i
          }
          print ""
        }' "$file"
      ;;
    *)
      # One-line form: "deb [opt=value ...] URI SUITE COMPONENT..." as a stanza.
      sed -n "${n}p" "$file" | awk -v type="$mode" '
        {
          sub(/#.*/, ""); opts = ""
          if ($2 ~ /^\[/) {
            line = $0; sub(/^[^[]*\[/, "", line); opts = line; sub(/\].*/, "", opts)
            sub(/^[^]]*\][ \t]*/, "", line); $0 = $1 " " line
          }
          print "Types: " type; print "URIs: " $2; print "Suites: " $3
          comps = $4; for (j = 5; j <= NF; j++) comps = comps " " $j
          print "Components: " comps
          m = split(opts, o, /[ \t]+/)
          for (j = 1; j <= m; j++) {
            if (split(o[j], kv, "=") != 2) continue
            key = tolower(kv[1])
            if (key == "signed-by") print "Signed-By: " kv[2]
            else if (key == "arch") print "Architectures: " kv[2]
            else if (key == "trusted") print "Trusted: " kv[2]
          }
          print ""
        }'
      ;;
  esac
done
