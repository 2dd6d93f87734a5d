//! The browser app's entry point: trunk builds this binary for wasm32 and loads it from
//! index.html.

#[cfg(target_arch = "wasm32")]
fn main() {
    console_error_panic_hook::set_once();
    leptos::mount::mount_to_body(qlora_web::ui::App);
}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    eprintln!(
        "qlora-web is a browser app: build it with `trunk build --release` in web/ and serve \
         web/dist (or run `trunk serve`)"
    );
    std::process::exit(2);
}
