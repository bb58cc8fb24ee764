//! The profiler's decorator, generated from the `Backend` trait (`src/backend/mod.rs`): `impl Backend for
//! Profiled<B>`, one method per trait method, so the profiler never restates the trait and a trait change it does
//! not follow fails to compile. Each method is one of three kinds, read from its signature:
//! - **timed** (it takes or returns `Self::Tensor`): `work::<op>(&self.inner, args)` estimates what the op does
//!   (FLOPs, bytes), then the inner backend's op runs between two timestamps (`Profiled::timed`);
//! - **hand-written** (it returns a wrapped weight or layout, or touches `Self::StepGraphs` or a closure):
//!   `self.<op>_profiled(args)`, written in `src/perf/profile/decorator.rs`;
//! - **delegated** (the device's facts, `dims`): the inner backend answers.
//!
//! Arguments reach the inner backend unwrapped (`&w.inner` for the wrapped weight and layout types); they reach the
//! cost model as shared references (`&*x` for a `&mut`, `&x` for an owned `Vec`), other owned values by copy.

use quote::{format_ident, quote};
use syn::{FnArg, Pat, ReturnType, TraitItem, Type};

/// Associated types the profiler gives its own type; the rest are the inner backend's.
const OWN_TYPES: &[(&str, &str)] = &[
    ("Weight", "ProfiledWeight<B::Weight>"),
    ("Layout", "ProfiledLayout<B::Layout>"),
    ("StepGraphs", "ProfiledStepGraphs"),
];

/// Wrapped types: what the inner backend takes is their `inner` field.
const WRAPPED: &[&str] = &["Self :: Weight", "Self :: Layout"];

/// Ops on tensors too cheap to time (read on the host, no device work).
const UNTIMED: &[&str] = &["dims"];

pub fn generate(trait_source: &str) -> String {
    let file = syn::parse_file(trait_source).expect("src/backend/mod.rs parses");
    let backend = file
        .items
        .iter()
        .find_map(|item| match item {
            syn::Item::Trait(t) if t.ident == "Backend" => Some(t),
            _ => None,
        })
        .expect("src/backend/mod.rs defines trait Backend");
    let mut items = Vec::new();
    for item in &backend.items {
        match item {
            TraitItem::Type(t) => items.push(associated_type(&t.ident)),
            TraitItem::Fn(f) => items.push(method(&f.sig)),
            _ => {}
        }
    }
    assert!(items.len() > 20, "the Backend trait has its ops");
    quote! {
        impl<B: Backend> Backend for Profiled<B> {
            #(#items)*
        }
    }
    .to_string()
}

fn associated_type(name: &syn::Ident) -> proc_macro2::TokenStream {
    let own = OWN_TYPES.iter().find(|(n, _)| name == n);
    let ty: Type = match own {
        Some((_, ty)) => syn::parse_str(ty).expect("own type parses"),
        None => syn::parse_quote!(B::#name),
    };
    quote! { type #name = #ty; }
}

fn method(sig: &syn::Signature) -> proc_macro2::TokenStream {
    let name = &sig.ident;
    let args: Vec<(&syn::Ident, &Type)> = sig
        .inputs
        .iter()
        .filter_map(|a| match a {
            FnArg::Typed(t) => match &*t.pat {
                Pat::Ident(p) => Some((&p.ident, &*t.ty)),
                _ => panic!("Backend::{name}: argument patterns must be names"),
            },
            FnArg::Receiver(_) => None,
        })
        .collect();
    let signature = text(sig);
    let returns = match &sig.output {
        ReturnType::Type(_, t) => text(t),
        ReturnType::Default => String::new(),
    };
    let hand_written = WRAPPED.iter().any(|w| returns.contains(w))
        || signature.contains("StepGraphs")
        || signature.contains("dyn");
    let names: Vec<_> = args.iter().map(|(n, _)| n).collect();
    let body = if hand_written {
        let own = format_ident!("{name}_profiled");
        quote! { self.#own(#(#names),*) }
    } else {
        let inner: Vec<_> = args.iter().map(|(n, t)| unwrapped(n, t)).collect();
        let call = quote! { self.inner.#name(#(#inner),*) };
        let timed = signature.contains("Self :: Tensor") && !UNTIMED.contains(&&*name.to_string());
        if timed {
            let work: Vec<_> = args.iter().map(|(n, t)| shared(n, t)).collect();
            let label = name.to_string();
            quote! {
                let cost = work::#name(&self.inner, #(#work),*);
                self.timed(#label, cost, || #call)
            }
        } else {
            call
        }
    };
    quote! { #sig { #body } }
}

/// The argument as the inner backend takes it.
fn unwrapped(name: &syn::Ident, ty: &Type) -> proc_macro2::TokenStream {
    let t = text(ty);
    let wrapped = WRAPPED.iter().any(|w| t.contains(w));
    match (wrapped, t.starts_with("Option")) {
        (false, _) => quote! { #name },
        (true, true) => quote! { #name.map(|x| &x.inner) },
        (true, false) => quote! { &#name.inner },
    }
}

/// The argument as the cost model takes it: shared references, copies of scalars.
fn shared(name: &syn::Ident, ty: &Type) -> proc_macro2::TokenStream {
    match ty {
        Type::Reference(r) if r.mutability.is_some() => quote! { &*#name },
        Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Vec") => {
            quote! { &#name }
        }
        _ => quote! { #name },
    }
}

fn text(tokens: &impl quote::ToTokens) -> String {
    tokens.to_token_stream().to_string()
}
