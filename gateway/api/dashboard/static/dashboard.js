// The gateway dashboard's only script (the Content-Security-Policy allows no other, and no inline
// code). Every page works without it; it adds two conveniences:
//  - buttons with data-copy="ID" copy the value of the element with that id (a new token, a link);
//  - an element with data-refresh="N" (the live sessions) is reloaded from the server every N seconds,
//    unless the page is hidden or the user is busy inside it (a focused button, an open <details>).
"use strict";

function copyFrom(button) {
  var field = document.getElementById(button.getAttribute("data-copy"));
  if (!field) {
    return;
  }
  var done = function () {
    button.textContent = "Copied";
  };
  var byHand = function () {
    field.focus();
    field.select();
    try {
      if (document.execCommand("copy")) {
        done();
        return;
      }
    } catch (e) {
      // fall through: the text stays selected for Ctrl+C
    }
    button.textContent = "Press Ctrl+C";
  };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(field.value).then(done, byHand);
  } else {
    byHand();
  }
}

function busy(section) {
  var active = document.activeElement;
  if (active && active !== document.body && section.contains(active)) {
    return true;
  }
  return section.querySelector("details[open]") !== null;
}

function refresh(section, seconds) {
  var timer = window.setInterval(function () {
    if (document.hidden || busy(section)) {
      return;
    }
    fetch(window.location.pathname, {credentials: "same-origin", headers: {"Accept": "text/html"}})
      .then(function (response) {
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html === null) {
          return;
        }
        var fresh = new DOMParser().parseFromString(html, "text/html").getElementById(section.id);
        if (fresh === null) {
          // Signed out meanwhile (the token was revoked, the session expired): show the sign-in page.
          window.clearInterval(timer);
          window.location.reload();
          return;
        }
        section.replaceWith(fresh);
        section = fresh;
      })
      .catch(function () {
        // the gateway is restarting or the network is down: try again next time
      });
  }, seconds * 1000);
}

document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("button[data-copy]").forEach(function (button) {
    button.hidden = false;
    button.addEventListener("click", function () {
      copyFrom(button);
    });
  });
  var live = document.querySelector("[data-refresh]");
  if (live && live.id) {
    refresh(live, Number(live.getAttribute("data-refresh")) || 5);
  }
});
