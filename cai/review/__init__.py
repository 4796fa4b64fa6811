"""`cai review`: a local page over a pairs file and its side files, where a person looks at each
pair and decides (accept, reject, swap, tie, skip, or edit the chosen text). `decisions` is the
decisions file and what downstream does with it; `index` the pairs file's index of line offsets;
`server` the HTTP server and its API; `static/` the page (no build step, nothing from elsewhere)."""
