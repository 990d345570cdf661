/* Atelier's offline stand-in for bootstrap-table in Great Expectations' Data Docs: GX pages build
   their tables with $(...).bootstrapTable({columns, data, sortName, sortOrder, rowAttributes}) from a
   CDN. This draws the same rows as a plain Bootstrap table, newest first, each row a link to its
   page. Method calls (clearFilterControl, resetSearch) do nothing: there are no filter controls. */
(function ($) {
  if (!$ || $.fn.bootstrapTable) { return; }
  $.fn.bootstrapTable = function (options) {
    if (typeof options !== "object" || options === null) { return this; }
    var columns = (options.columns || []).filter(function (c) { return c.visible !== false && c.visible !== "false"; });
    var rows = (options.data || []).slice();
    var sortColumn = columns.filter(function (c) { return c.field === options.sortName; })[0];
    var sortKey = sortColumn ? (sortColumn.sortName || sortColumn.field) : options.sortName;
    if (sortKey) {
      var sign = options.sortOrder === "desc" ? -1 : 1;
      rows.sort(function (a, b) { return a[sortKey] < b[sortKey] ? -sign : a[sortKey] > b[sortKey] ? sign : 0; });
    }
    return this.each(function () {
      var table = $(this).addClass("table table-hover table-sm");
      var head = $("<tr>").appendTo($("<thead>").appendTo(table.empty()));
      columns.forEach(function (c) { $("<th>").text(c.title || c.field).appendTo(head); });
      var body = $("<tbody>").appendTo(table);
      rows.forEach(function (row) {
        var tr = $("<tr>").appendTo(body);
        columns.forEach(function (c) { $("<td>").html(row[c.field] === undefined ? "" : String(row[c.field])).appendTo(tr); });
        if (row._table_row_link_path) {
          tr.css("cursor", "pointer").on("click", function () { window.location = row._table_row_link_path; });
        }
      });
    });
  };
})(window.jQuery);
