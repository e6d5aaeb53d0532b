// The gateway dashboard's only script: refresh the live tables, and the copy button.
// Everything is built with textContent: nothing from the server is parsed as HTML.
"use strict";

(function () {
  const POLL_MS = 3000;

  function cell(text, className) {
    const td = document.createElement("td");
    if (className) td.className = className;
    td.textContent = text;
    return td;
  }

  function fill(tbody, rows, columns, empty) {
    const out = [];
    if (rows.length === 0) {
      const tr = document.createElement("tr");
      tr.className = "empty";
      const td = cell(empty);
      td.colSpan = columns;
      tr.appendChild(td);
      out.push(tr);
    }
    for (const cells of rows) {
      const tr = document.createElement("tr");
      for (const c of cells) tr.appendChild(c);
      out.push(tr);
    }
    tbody.replaceChildren(...out);
  }

  function code(text, className) {
    const td = document.createElement("td");
    const c = document.createElement("code");
    if (className) c.className = className;
    c.textContent = text;
    td.appendChild(c);
    return td;
  }

  function badge(state) {
    const td = document.createElement("td");
    const span = document.createElement("span");
    span.className = "badge " + ({ closed: "ok", half_open: "warn", open: "bad" }[state] || "");
    span.textContent = state.replace("_", "-");
    td.appendChild(span);
    return td;
  }

  function render(data) {
    const live = document.querySelector("table.live tbody");
    if (live) {
      fill(
        live,
        data.in_flight.map((r) => [
          code(r.request_id, "id"),
          cell(r.key_id || "—"),
          cell(r.model || "—"),
          cell(r.age_seconds.toFixed(1) + " s", "num"),
          cell(r.stream ? "stream" : "—"),
        ]),
        5,
        "Nothing in flight."
      );
    }
    const breakers = document.querySelector("table.breakers tbody");
    if (breakers) {
      fill(
        breakers,
        data.breakers.map((b) => [code(b.deployment), badge(b.state)]),
        2,
        "No deployments configured."
      );
    }
    const count = document.querySelector('[data-live="count"]');
    if (count) count.textContent = String(data.in_flight.length);
  }

  function status(kind) {
    for (const dot of document.querySelectorAll('[data-live="status"]')) {
      dot.classList.remove("on", "stale");
      dot.classList.add(kind);
      dot.title = kind === "on" ? "updated every few seconds" : "cannot reach the gateway";
    }
  }

  async function poll() {
    try {
      const resp = await fetch("/dashboard/live.json", {
        credentials: "same-origin",
        cache: "no-store",
      });
      if (resp.status === 401) {
        window.location.assign("/dashboard/login");
        return;
      }
      if (!resp.ok) throw new Error(String(resp.status));
      render(await resp.json());
      status("on");
    } catch (e) {
      status("stale");
    }
    setTimeout(poll, POLL_MS);
  }

  function copyButtons() {
    for (const button of document.querySelectorAll("[data-copy]")) {
      button.addEventListener("click", async () => {
        const input = document.getElementById(button.dataset.copy);
        if (!input) return;
        input.focus();
        input.select();
        let ok = false;
        try {
          await navigator.clipboard.writeText(input.value);
          ok = true;
        } catch (e) {
          ok = document.execCommand && document.execCommand("copy");
        }
        button.textContent = ok ? "Copied" : "Press Ctrl+C";
      });
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    copyButtons();
    if (document.querySelector("table.live, table.breakers")) {
      status("on");
      setTimeout(poll, POLL_MS);
    }
  });
})();
