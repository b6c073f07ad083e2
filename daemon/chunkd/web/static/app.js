// chunkd web: live fragments, on-request panels and the chunk map. Plain JavaScript, no build.
"use strict";

(function () {
  const refreshMs = Number(document.body.dataset.refreshMs || 2000);

  async function get(url, accept) {
    const response = await fetch(url, {
      credentials: "same-origin",
      headers: { Accept: accept || "text/html" },
    });
    if (response.status === 401) {
      window.location.reload(); // the session ended: show the login form
      throw new Error("unauthorized");
    }
    return response;
  }

  // Elements with data-refresh="URL" are replaced by that URL's HTML every refreshMs, until
  // the server marks the fragment final (X-Chunkd-Final: 1).
  function live(element) {
    const tick = async () => {
      try {
        const response = await get(element.dataset.refresh);
        if (response.ok) {
          element.innerHTML = await response.text();
          element.dataset.updated = String(Date.now());
          if (response.headers.get("X-Chunkd-Final") === "1") return;
        }
      } catch (error) {
        // The server may be restarting: try again on the next tick.
      }
      window.setTimeout(tick, refreshMs);
    };
    window.setTimeout(tick, refreshMs);
  }

  // Buttons with data-load="URL" data-into="ID" fetch a panel on request (payloads, chunks).
  document.addEventListener("click", async (event) => {
    const button = event.target.closest("[data-load]");
    if (!button) return;
    const target = document.getElementById(button.dataset.into);
    const response = await get(button.dataset.load);
    target.innerHTML = await response.text();
  });

  // The chunk map: one cell per chunk, by seq, coloured by state, drawn on a canvas so that
  // 100,000 chunks stay quick. Geometry is published on the element (data-cells,
  // data-cell-size, data-columns) for tools and tests.
  const STATE_COLOURS = { p: "--pending", w: "--waiting", r: "--processing",
                          c: "--completed", f: "--failed", x: "--cancelled" };
  const STATE_NAMES = { p: "pending", w: "waiting", r: "processing",
                        c: "completed", f: "failed", x: "cancelled" };

  function chunkMap(canvas) {
    const style = getComputedStyle(document.documentElement);
    const colours = {};
    for (const [code, variable] of Object.entries(STATE_COLOURS)) {
      colours[code] = style.getPropertyValue(variable).trim();
    }
    let states = "";
    let geometry = { cell: 16, columns: 1 };

    function draw() {
      const n = states.length;
      const width = Math.max(canvas.parentElement.clientWidth - 8, 100);
      const cell = Math.max(2, Math.min(16, Math.floor(Math.sqrt((width * 400) / Math.max(n, 1)))));
      const gap = cell >= 5 ? 1 : 0;
      const columns = Math.max(1, Math.floor(width / cell));
      const rows = Math.max(1, Math.ceil(n / columns));
      const ratio = window.devicePixelRatio || 1;
      canvas.style.width = columns * cell + "px";
      canvas.style.height = rows * cell + "px";
      canvas.width = Math.round(columns * cell * ratio);
      canvas.height = Math.round(rows * cell * ratio);
      const context = canvas.getContext("2d");
      context.setTransform(ratio, 0, 0, ratio, 0, 0);
      context.clearRect(0, 0, columns * cell, rows * cell);
      for (const code of Object.keys(colours)) {
        context.fillStyle = colours[code];
        for (let seq = states.indexOf(code); seq !== -1; seq = states.indexOf(code, seq + 1)) {
          context.fillRect((seq % columns) * cell, Math.floor(seq / columns) * cell,
                           cell - gap, cell - gap);
        }
      }
      geometry = { cell: cell, columns: columns };
      canvas.dataset.cells = String(n);
      canvas.dataset.cellSize = String(cell);
      canvas.dataset.columns = String(columns);
      canvas.dataset.drawn = String(Date.now());
    }

    function seqAt(event) {
      const box = canvas.getBoundingClientRect();
      const column = Math.floor((event.clientX - box.left) / geometry.cell);
      const row = Math.floor((event.clientY - box.top) / geometry.cell);
      const seq = row * geometry.columns + column;
      return column < geometry.columns && seq >= 0 && seq < states.length ? seq : null;
    }

    canvas.addEventListener("mousemove", (event) => {
      const seq = seqAt(event);
      canvas.title = seq === null ? "" : "#" + seq + ": " + STATE_NAMES[states[seq]];
    });
    canvas.addEventListener("click", async (event) => {
      const seq = seqAt(event);
      if (seq === null) return;
      const response = await get(canvas.dataset.chunkUrl + seq);
      document.getElementById("chunk-detail").innerHTML = await response.text();
    });
    window.addEventListener("resize", () => states && draw());

    const interval = Math.max(refreshMs, Number(canvas.dataset.chunks || 0) / 20);
    const load = async () => {
      let finished = false;
      try {
        const response = await get(canvas.dataset.url, "application/json");
        if (response.ok) {
          states = (await response.json()).states;
          draw();
          finished = !/[pwr]/.test(states);
        }
      } catch (error) {
        // try again on the next tick
      }
      // A finished job changes only if someone retries it: look again, rarely.
      window.setTimeout(load, finished ? interval * 10 : interval);
    };
    load();
  }

  document.querySelectorAll("[data-refresh]").forEach(live);
  document.querySelectorAll("canvas.chunk-map").forEach(chunkMap);
})();
