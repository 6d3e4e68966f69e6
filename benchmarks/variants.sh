# Sourced by the variant scripts (block_recon_*.sh, calibration_*.sh): one run of the chain per variant,
# in $R/<name>, its quantize and eval JSONs beside it as $R/<name>.{quantize,eval}.json.
variant() {  # name [bitflux flags: --set KEY=VALUE ...]
  local name=$1; shift
  bitflux quantize --workdir "$R/$name" --json "$@" > "$R/$name.quantize.json"
  bitflux pack --workdir "$R/$name" --json > /dev/null
  bitflux eval --workdir "$R/$name" --json > "$R/$name.eval.json"
}

fresh_from() {  # from name: $R/<name> emptied, with a copy of $R/<from>'s calibration (quantize then skips calibrating)
  rm -rf "$R/$2"; mkdir -p "$R/$2"; cp -r "$R/$1/calib" "$R/$2/"
}
