#!/usr/bin/env bash
# Rebuild dvc_plots/offline.html: DVC's plot page with vega, vega-lite and vega-embed inlined,
# so `dvc plots show` renders without reaching a CDN. Needs npm (the npm registry).
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2 >/dev/null && for f in *.tgz; do mkdir "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done)
{
  echo '<!DOCTYPE html>'
  echo '<html><head>{refresh_tag}<meta charset="utf-8"><title>domlora plots</title>'
  echo '<style>body{font-family:sans-serif} table{border-spacing:15px}</style>'
  for lib in vega-5.20.2/package/build/vega.min.js vega-lite-5.2.0/package/build/vega-lite.min.js vega-embed-6.18.2/package/build/vega-embed.min.js; do
    echo "<script>"; cat "$tmp/$lib"; echo; echo "</script>"
  done
  echo '</head><body>'
  echo '{plot_divs}'
  echo '</body></html>'
} > dvc_plots/offline.html
echo "wrote dvc_plots/offline.html ($(du -k dvc_plots/offline.html | cut -f1) KiB)"
