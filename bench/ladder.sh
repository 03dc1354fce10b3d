#!/usr/bin/env bash
# Ladder benchmark: one 20 s 1080p30 clip with audio, the hd ladder (1080p 5000k, 720p 3000k,
# 480p 1500k, 360p 800k; veryfast; keyframes every 60 frames, scenecut=0), transcoded three ways
# in this one invocation:
#   (a) gst-launch-1.0 running the transcoder's own graph (one decode, tee, four encodes, AAC
#       encoded once and teed) with byte-identical x264enc settings, on local files;
#   (b) ffmpeg with one input and four outputs, with equivalent settings;
#   (c) our transcoder (`transcode()`) through the release `bench-ladder` binary;
#   (d) our whole worker pipeline: a release scaler and one worker on SQLite and a `file://`
#       object folder, timed from `transcode submit --wait` to the task's end, so the pull
#       (a copy into scratch, hashed), the transcode, the upload (hashed), the manifest, and
#       every event written to the store and published on the bus are all inside the figure.
# Prints each wall time and the ratios of (c) and (d) to gst-launch and ffmpeg. Not a test.
#
#   bench/ladder.sh            one run of each
#   RUNS=3 bench/ladder.sh     three interleaved rounds; the best time of each is kept, which is
#                              the fairest figure on a machine shared with other work
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
runs=${RUNS:-1}

data="$root/target/bench-data"
src="$data/ladder-1080p30-20s.mp4"
mkdir -p "$data"
if [[ ! -s "$src" ]]; then
    echo "generating $src (once; cached)" >&2
    # testsrc2 moves and the light temporal noise keeps x264 from coasting on a static picture.
    ffmpeg -nostdin -v error -y \
        -f lavfi -i "testsrc2=size=1920x1080:rate=30:duration=20,noise=alls=8:allf=t" \
        -f lavfi -i "sine=frequency=440:sample_rate=48000:duration=20" \
        -c:v libx264 -preset veryfast -b:v 8000k -pix_fmt yuv420p \
        -c:a aac -b:a 128k -shortest "$src.tmp.mp4"
    mv "$src.tmp.mp4" "$src"
fi

cargo build --release -q -p transcode-bench --bin bench-ladder
cargo build --release -q --bins -p transcode-scaler -p transcode-worker -p transcode-cli
bin="$root/target/release/bench-ladder"
threads=$("$bin" --print-x264-threads)

work=$(mktemp -d /tmp/transcode-ladder.XXXXXX)
pids=()
cleanup() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# The hd ladder: name width height kbps (the transcoder reads the same from transcode_core).
rungs=("1080p 1920 1080 5000" "720p 1280 720 3000" "480p 854 480 1500" "360p 640 360 800")
preset=veryfast
keyint=60      # 2 s at the source's 30 fps, as the transcoder computes it
audio_bps=128000

now() { date +%s.%N; }

run_gst() {
    local out="$work/gst" args i=0 name w h kbps
    mkdir -p "$out"
    args=(filesrc "location=$src" ! decodebin name=d
          d. ! videoconvert ! video/x-raw,format=I420 ! tee name=vt)
    for r in "${rungs[@]}"; do
        read -r name w h kbps <<<"$r"
        args+=(vt. ! queue ! videoscale ! videorate
               ! "video/x-raw,width=$w,height=$h,pixel-aspect-ratio=1/1,framerate=30/1"
               ! x264enc "bitrate=$kbps" "speed-preset=$preset" "key-int-max=$keyint"
                 option-string=scenecut=0 "threads=$threads"
               ! h264parse ! mp4mux "name=m$i" ! filesink "location=$out/$name.mp4")
        i=$((i + 1))
    done
    args+=(d. ! audioconvert ! audioresample ! avenc_aac "bitrate=$audio_bps" ! tee name=at)
    for ((j = 0; j < i; j++)); do
        args+=(at. ! queue ! "m$j.")
    done
    gst-launch-1.0 -q "${args[@]}" >/dev/null
}

run_ffmpeg() {
    local out="$work/ffmpeg" split="" filter args=() i=0 name w h kbps
    mkdir -p "$out"
    for ((j = 0; j < ${#rungs[@]}; j++)); do split+="[v$j]"; done
    filter="[0:v]split=${#rungs[@]}$split"
    for r in "${rungs[@]}"; do
        read -r name w h kbps <<<"$r"
        # bilinear, as videoscale; maxrate and a 600 ms buffer, as x264enc's default cbr pass.
        filter+=";[v$i]scale=$w:$h:flags=bilinear,setsar=1[o$i]"
        args+=(-map "[o$i]" -map 0:a
               -c:v libx264 -preset "$preset" -b:v "${kbps}k" -maxrate "${kbps}k"
               -bufsize "$((kbps * 6 / 10))k" -g "$keyint" -keyint_min "$keyint"
               -sc_threshold 0 -threads "$threads"
               -c:a aac -b:a "$audio_bps" "$out/$name.mp4")
        i=$((i + 1))
    done
    ffmpeg -nostdin -v error -y -i "$src" -filter_complex "$filter" "${args[@]}"
}

run_ours() {
    "$bin" --input "$src" --out-dir "$work/ours" --ladder hd --codec-preset "$preset" \
        >"$work/ours.txt"
}

# (d): the farm is started once, before any timing, as it would be running in production.
start_farm() {
    local ports rel="$root/target/release"
    ports=($(python3 -c 'import socket
s=[socket.socket() for _ in range(4)]
[x.bind(("127.0.0.1",0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))'))
    intake="tcp://127.0.0.1:${ports[0]}"
    events_pub="tcp://127.0.0.1:${ports[2]}"
    store="sqlite://$work/farm.db"
    mkdir -p "$work/farm"
    "$rel/transcode-scaler" --store "$store" --migrate --intake "$intake" \
        --dispatch "tcp://127.0.0.1:${ports[1]}" --events-pub "$events_pub" \
        --events-sub "tcp://127.0.0.1:${ports[3]}" --http 127.0.0.1:0 --id bench-scaler \
        >"$work/farm/scaler.out" 2>"$work/farm/scaler.log" &
    pids+=($!)
    "$rel/transcode-worker" --store "$store" --dispatch "tcp://127.0.0.1:${ports[1]}" \
        --events "tcp://127.0.0.1:${ports[3]}" --id bench-worker --slots 1 \
        --scratch-dir "$work/farm/scratch" --http 127.0.0.1:0 \
        >"$work/farm/worker.out" 2>"$work/farm/worker.log" &
    pids+=($!)
    # Both print one JSON line once they serve.
    for f in scaler worker; do
        for _ in $(seq 1 300); do [[ -s "$work/farm/$f.out" ]] && break; sleep 0.1; done
        [[ -s "$work/farm/$f.out" ]] || { echo "$f did not start:" >&2; tail "$work/farm/$f.log" >&2; exit 1; }
    done
}

run_pipeline() {
    # A fresh output prefix per round: the task writes under it and must not find old files.
    local n=${run_no:-1}
    TRANSCODE_SCALER_INTAKE="$intake" TRANSCODE_SCALER_EVENTS_PUB="$events_pub" \
        "$root/target/release/transcode" --store "$store" submit --wait \
        --source "file://$src" --output "file://$work/pipe-$n/" --preset hd \
        --codec-preset "$preset" >"$work/pipeline.txt" 2>&1 \
        || { echo "pipeline run failed:" >&2; cat "$work/pipeline.txt" >&2; tail "$work/farm/worker.log" >&2; exit 1; }
}

timed() {
    local start end
    rm -rf "${work:?}/gst" "$work/ffmpeg" "$work/ours"
    start=$(now)
    "$@"
    end=$(now)
    awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f", b - a }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a / b }'; }
best() { printf '%s\n' "$@" | sort -g | head -1; }

start_farm
gst_times=() ffmpeg_times=() ours_times=() pipe_times=()
for ((round = 1; round <= runs; round++)); do
    gst_times+=("$(timed run_gst)")
    ffmpeg_times+=("$(timed run_ffmpeg)")
    ours_times+=("$(timed run_ours)")
    run_no=$round
    pipe_times+=("$(timed run_pipeline)")
done
gst_s=$(best "${gst_times[@]}")
ffmpeg_s=$(best "${ffmpeg_times[@]}")
ours_s=$(best "${ours_times[@]}")
pipe_s=$(best "${pipe_times[@]}")

echo "== ladder: 20 s 1080p30 + AAC -> hd ladder (4 rungs), $preset, x264 threads=$threads, best of $runs"
printf 'gst-launch-1.0 (same graph)       %8.2f s\n' "$gst_s"
printf 'ffmpeg (1 input, 4 outputs)       %8.2f s\n' "$ffmpeg_s"
printf 'transcoder only (bench-ladder)    %8.2f s   (in-process: %s s)\n' "$ours_s" \
    "$(sed -n 's/^transcode_seconds=//p' "$work/ours.txt")"
printf 'whole pipeline (submit -> done)   %8.2f s   (pull, transcode, upload, manifest, events)\n' "$pipe_s"
printf 'ratio transcoder/gst-launch       %8.3f   (target <= 1.05)\n' "$(ratio "$ours_s" "$gst_s")"
printf 'ratio transcoder/ffmpeg           %8.3f\n' "$(ratio "$ours_s" "$ffmpeg_s")"
printf 'ratio pipeline/gst-launch         %8.3f   (target <= 1.05)\n' "$(ratio "$pipe_s" "$gst_s")"
printf 'ratio pipeline/ffmpeg             %8.3f\n' "$(ratio "$pipe_s" "$ffmpeg_s")"
grep '^output=' "$work/ours.txt" | sed 's/^/  /'
