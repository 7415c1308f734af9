// Numbers as people read them: bytes, rates, durations, times.

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

/** Bytes in binary units: "1.5 GiB". */
export function bytes(n) {
  if (n == null || !isFinite(n)) return "–";
  let i = 0;
  while (Math.abs(n) >= 1024 && i < UNITS.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${UNITS[i]}`;
}

/** A rate in decimal megabytes per second, as links are sold: "118 MB/s". */
export function rate(bps) {
  if (bps == null || !isFinite(bps)) return "–";
  const mb = bps / 1e6;
  return `${mb < 10 ? mb.toFixed(1) : mb.toFixed(0)} MB/s`;
}

/** Seconds as "1 m 05 s", "4.2 s" or "350 ms". */
export function seconds(s) {
  if (s == null || !isFinite(s)) return "–";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  const whole = Math.round(s);
  return `${Math.floor(whole / 60)} m ${String(whole % 60).padStart(2, "0")} s`;
}

/** Milliseconds: "35 ms". */
export function ms(v) {
  return v == null || !isFinite(v) ? "–" : `${Math.round(v)} ms`;
}

/** A wall-clock time from ms since the epoch: "14:05:31". */
export function clock(epochMs) {
  return epochMs ? new Date(epochMs).toLocaleTimeString() : "–";
}

/** A percentage: "41 %". */
export function pct(v) {
  return `${Math.floor(v)} %`;
}
