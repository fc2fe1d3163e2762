# Sourced by the benchmark scripts: what starting a server and waiting for it takes.

wait_healthy() {  # wait_healthy BASE_URL: up to 300 s for its /health to answer
  for _ in $(seq 1 300); do
    if curl -sf "$1/health" > /dev/null; then return 0; fi
    sleep 1
  done
  echo "$1 did not become healthy" >&2
  return 1
}
