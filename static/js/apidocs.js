// Renders the OpenAPI document for people (/api/docs/): operations by tag, their parameters,
// bodies, answers and the schemas they name. Self-written and small so nothing comes from a CDN.
(function () {
  "use strict";
  const main = document.querySelector("[data-document]");
  const out = document.getElementById("reference");

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    for (const child of children) {
      if (child == null) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function schemaBlock(schema) {
    if (!schema) return null;
    if (schema.$ref) {
      const name = schema.$ref.split("/").pop();
      return el("p", {}, "Schema: ", el("a", { href: "#schema-" + name }, name));
    }
    return el("pre", {}, JSON.stringify(schema, null, 2));
  }

  function content(body) {
    const parts = [];
    for (const [type, media] of Object.entries((body && body.content) || {})) {
      parts.push(el("p", {}, el("code", {}, type)), schemaBlock(media.schema));
      if (media.example) parts.push(el("pre", {}, media.example));
    }
    return parts;
  }

  function operation(path, method, op) {
    const section = el("section", { class: "op", id: (method + path).replace(/[^a-z0-9]+/gi, "-") });
    section.append(el("h3", {}, el("span", { class: "method" }, method), el("span", { class: "path" }, path)));
    section.append(el("p", {}, op.summary || ""));
    if (op.description) section.append(el("p", { class: "desc" }, op.description));
    const security = (op.security || []).flatMap((s) => Object.keys(s));
    section.append(el("p", {}, "Authentication: ", security.length ? security.join(" or ") : "none"));
    if (op.parameters && op.parameters.length) {
      const table = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"), el("th", {}, "schema"), el("th", {}, "description")));
      for (const p of op.parameters) {
        table.append(el("tr", {}, el("td", {}, p.name), el("td", {}, p.in), el("td", {}, el("code", {}, JSON.stringify(p.schema))), el("td", {}, p.description || "")));
      }
      section.append(el("h4", {}, "Parameters"), table);
    }
    if (op.requestBody) section.append(el("h4", {}, "Request body"), ...content(op.requestBody));
    section.append(el("h4", {}, "Answers"));
    for (const [status, answer] of Object.entries(op.responses || {})) {
      section.append(el("p", {}, el("strong", {}, status), " — ", answer.description || ""), ...content(answer));
    }
    return section;
  }

  function render(doc) {
    out.replaceChildren();
    if (doc.info && doc.info.description) out.append(el("p", { class: "desc" }, doc.info.description));
    const byTag = new Map((doc.tags || []).map((t) => [t.name, []]));
    for (const [path, item] of Object.entries(doc.paths || {})) {
      for (const [method, op] of Object.entries(item)) {
        const tag = (op.tags || ["other"])[0];
        if (!byTag.has(tag)) byTag.set(tag, []);
        byTag.get(tag).push(operation(path, method, op));
      }
    }
    for (const [tag, sections] of byTag) {
      if (sections.length) out.append(el("h2", { id: "tag-" + tag }, tag), ...sections);
    }
    const schemes = (doc.components && doc.components.securitySchemes) || {};
    out.append(el("h2", {}, "Authentication schemes"));
    for (const [name, scheme] of Object.entries(schemes)) {
      out.append(el("p", {}, el("strong", {}, name), ": ", scheme.description || scheme.type));
    }
    out.append(el("h2", {}, "Schemas"));
    for (const [name, schema] of Object.entries((doc.components && doc.components.schemas) || {})) {
      out.append(el("h3", { id: "schema-" + name }, name), el("pre", {}, JSON.stringify(schema, null, 2)));
    }
  }

  fetch(main.dataset.document, { headers: { Accept: "application/json" } })
    .then((response) => {
      if (!response.ok) throw new Error("HTTP " + response.status);
      return response.json();
    })
    .then(render)
    .catch((error) => out.replaceChildren(el("p", {}, "Could not load the document: " + error.message)));
})();
