"""Step 4's library: control maps (`controls`), the work plan (`plan`), the diffusers pipeline (`pipeline`),
one batch from maps to labelled files (`maker`) and the output layout (`outputs`)."""
