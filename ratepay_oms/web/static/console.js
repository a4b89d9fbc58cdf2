// ratepay-oms web console: the only script. Everything works without it; it adds a
// "select every item" box to the items table.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("input.select-all").forEach(function (box) {
    box.addEventListener("change", function () {
      var table = box.closest("table");
      table.querySelectorAll("input[name=item_id]:not(:disabled)").forEach(function (item) {
        item.checked = box.checked;
      });
    });
  });
});
